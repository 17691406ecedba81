"""The dispatcher: the public gRPC API. It routes every call to the worker of the call's user,
starting that worker on first use and stopping it when it has been idle long enough."""

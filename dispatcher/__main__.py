"""`python -m dispatcher`: settings come from the UPW_* environment."""

import asyncio
import sys

from conventions import logs
from conventions.config import ConfigError, from_env
from dispatcher.server import serve


def main() -> int:
    try:
        settings = from_env()
    except ConfigError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 2
    logs.setup("dispatcher", settings.log_level)
    try:
        asyncio.run(serve(settings))
    except ConfigError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

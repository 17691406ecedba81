"""Entrypoint of the envoy image: renders the configuration from the UPW_* environment, then
becomes Envoy (exec, so Envoy is PID 1 and receives the container's signals).

The template and the descriptor set are the ones copied into the image next to this file; the
configuration is written to UPW_ENVOY_CONFIG (default /tmp/envoy.yaml, so a read-only root with
a tmpfs on /tmp works). Extra arguments are passed to Envoy.
"""

import os
import sys
from pathlib import Path

from conventions.config import ConfigError, from_env
from launcher import envoy_config

HERE = Path(__file__).resolve().parent


def main() -> None:
    try:
        settings = from_env()
    except ConfigError as exc:
        sys.exit(f"envoy: {exc}")
    # The admin socket lives in the run dir (see launcher/envoy_config.py).
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    config = Path(os.environ.get("UPW_ENVOY_CONFIG", "/tmp/envoy.yaml"))
    config.write_text(
        envoy_config.render(
            settings, template=HERE / "envoy.yaml.tmpl", descriptor_set=HERE / "upw.pb"
        )
    )
    argv = envoy_config.envoy_command(config, settings) + sys.argv[1:]
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()

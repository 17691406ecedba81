"""One log line per event, to stderr, with the component named."""

from __future__ import annotations

import logging


def setup(component: str, level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s",
        force=True,
    )

"""Built-in `forward.*` processors; each module lists its classes in ``PROCESSORS``."""

from __future__ import annotations

import importlib
from typing import Any, Final

from mailpipe import hookimpl

MODULES: Final = ("smtp", "webhook", "command", "nats", "rabbitmq", "redis")


@hookimpl
def mailpipe_register_processors(register: Any) -> None:
    """Register every processor class of the modules in :data:`MODULES`."""
    for name in MODULES:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # not written yet
            raise
        for cls in module.PROCESSORS:
            register(cls)

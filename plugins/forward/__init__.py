"""Built-in ``forward.*`` processors; each module lists its classes in ``PROCESSORS``."""

from __future__ import annotations

from typing import Final

from mailpipe import hookimpl
from mailpipe.registry import Register, register_modules

MODULES: Final = ("smtp", "webhook", "command", "nats", "rabbitmq", "redis")


@hookimpl
def mailpipe_register_processors(register: Register) -> None:
    """Register every processor class of the modules in :data:`MODULES`."""
    register_modules(register, __name__, MODULES)

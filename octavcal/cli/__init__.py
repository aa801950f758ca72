"""The command line: a thin layer that parses options, calls one library function, and renders."""

from .. import _interrupted_at_start_up

try:  # Ctrl-C while the commands' modules are still importing: one line, exit 130
    from . import commands, runtimes  # noqa: F401  (they register their commands on ``main``)
    from .base import main
except KeyboardInterrupt:
    _interrupted_at_start_up()
    raise

__all__ = ["main"]

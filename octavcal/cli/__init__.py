"""The command line: a thin layer that parses options, calls one library function, and renders.

Importing it and ``--help`` import neither torch nor numpy nor rich: each command imports what it
uses when it runs.
"""

from .interrupts import guard_start_up

guard_start_up()  # before the imports below, which a Ctrl-C may interrupt

from . import analysis, commands, runtimes  # noqa: E402, F401  (they register their commands on ``main``)
from .base import main  # noqa: E402

__all__ = ["main"]

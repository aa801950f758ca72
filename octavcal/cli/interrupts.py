"""Ctrl-C on the command line: one line and exit 130, never a traceback, from the first import on.

torch is imported when a command runs (so that ``--help`` is quick), which is why this guard lasts
past the command line's own imports and into the command.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

MESSAGE = "Interrupted; no output was written."


class _Guard:
    """The command line's SIGINT handler.

    Until a command runs (imports, option parsing, --help, then torch's import) nothing has been
    written, so a Ctrl-C ends the process at once: an exception raised at an arbitrary point of an
    import can be lost, break the import system's locks, or abort in torch's C++ code (all seen
    here), and click would turn it into 'Aborted!'.

    Once a command runs, a Ctrl-C is a KeyboardInterrupt, so that the command's outputs are removed on
    its way out; and it is remembered: an import it interrupts (the modules a command imports when it
    runs) can fail later with another error, or not at all, which is then the interrupt too.
    """

    def __init__(self) -> None:
        self.installed = False
        self.running = False
        self.seen = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.running:
            sys.stderr.write(MESSAGE + "\n")
            sys.stderr.flush()
            os._exit(130)
        self.seen = True
        raise KeyboardInterrupt


_guard = _Guard()


def _on_command_line() -> bool:
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("octavcal", "__main__.py", "-m")


def guard_start_up() -> None:
    """On the command line (not when octavcal.cli is imported by other code), take over Ctrl-C."""
    if _on_command_line() and threading.current_thread() is threading.main_thread() and not _guard.installed:
        signal.signal(signal.SIGINT, _guard.handle)
        _guard.installed = True


@contextmanager
def command_running() -> Iterator[None]:
    """Run a command: a Ctrl-C inside is a KeyboardInterrupt, and so is any error that follows one.

    torch is imported first, while a Ctrl-C still ends the process at once: every command uses it and
    it is most of the start-up.
    """
    import torch  # noqa: F401

    _guard.running = True  # for good: after this the command may have written its outputs
    try:
        yield
    except BaseException as exc:
        if _guard.seen and not isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        raise

"""Writing outputs: nothing half-written, nothing overwritten by mistake.

A file is written to a hidden temporary name in its folder, fsynced, then renamed. Inside
``output_set()`` (one command's outputs) the renames wait until every file is written, so the files
of a command appear all together or not at all.
"""

from __future__ import annotations

import contextvars
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


class _OutputSet:
    def __init__(self) -> None:
        self.pending: list[tuple[str, Path]] = []
        self.created: list[Path] = []  # folders made for the outputs, removed again with them

    def commit(self) -> None:
        for tmp, path in self.pending:
            os.replace(tmp, path)
        self.pending.clear()

    def discard(self) -> None:
        for tmp, _ in self.pending:
            Path(tmp).unlink(missing_ok=True)
        self.pending.clear()
        for folder in reversed(self.created):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


_current: contextvars.ContextVar[_OutputSet | None] = contextvars.ContextVar("octavcal_outputs", default=None)


@contextmanager
def output_set() -> Iterator[None]:
    """Every ``atomic_write`` inside appears at the end, all together; on any error or Ctrl-C, none."""
    outputs = _OutputSet()
    token = _current.set(outputs)
    try:
        yield
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    finally:
        _current.reset(token)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of a run that was killed (their process is gone) are removed, never reused."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    outputs = _current.get()
    missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    if outputs is not None:
        outputs.created += reversed(missing)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if outputs is None:
            os.replace(tmp, path)
        else:
            outputs.pending.append((tmp, path))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output(path: str | Path, inputs: Iterable[str | Path | None] = (), what: str = "Output") -> Path:
    """Refuse, before any work, an output that is a folder, sits under a file, cannot be written, or is
    one of the inputs (``-o`` naming the checkpoint would overwrite it)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} '{path}' is a directory; give a file name.")
    for given in inputs:
        if given is not None and Path(given).exists() and _same_file(path, Path(given)):
            raise OutputError(
                f"{what} '{path}' is the input file '{given}'; writing it would destroy the input."
            )
    _check_folder_above(path, path.parent, what, "written")
    return path


def check_output_folder(path: str | Path, what: str = "Output folder") -> Path:
    """Like ``check_output`` for a folder of outputs (compare's report, evaluate's plots)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} '{path}' is a file, not a folder.")
    _check_folder_above(path, path, what, "created")
    return path


def _check_folder_above(path: Path, start: Path, what: str, verb: str) -> None:
    """The nearest existing folder at or above ``start`` must be a writable folder."""
    parent = start
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} '{path}' cannot be {verb}: '{parent}' is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{path}' cannot be written: the folder '{parent}' is not writable.")


def _same_file(a: Path, b: Path) -> bool:
    if a.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()

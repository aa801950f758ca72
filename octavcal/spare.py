"""The core that the statistics leave idle.

Statistics run on one thread where torch would use every core (``candidates.statistics_threads``), so
while they run a core has nothing to do. The hash of the model's weights (``fingerprint.py``) waits at
a gate that is open only then. (The statistics themselves are bound by memory: splitting a pass over
two threads gained nothing here.)
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_gates: set[threading.Event] = set()
_spare = False


def spare_core(spare: bool) -> None:
    """Say whether a core is idle now (the statistics run on one thread where torch would use more)."""
    global _spare
    with _lock:
        _spare = spare
        for gate in _gates:
            if spare:
                gate.set()
            else:
                gate.clear()


def gate() -> threading.Event:
    """An event that is set exactly while a core is spare (until ``drop_gate``)."""
    event = threading.Event()
    with _lock:
        _gates.add(event)
        if _spare:
            event.set()
    return event


def drop_gate(event: threading.Event) -> None:
    """Stop following the spare core; the event stays as it is."""
    with _lock:
        _gates.discard(event)

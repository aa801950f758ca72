"""Running over several processes (torch.distributed): who runs which batch, and one status exchange.

Every rank reads the same global stream of batches and runs batch i when i % world == rank. After each
round of ``world`` batches (and before anything is kept) the ranks exchange a small status, so a
failure anywhere stops every rank with the same error, naming the rank. The merging of results
lives with the code that owns them (calibrate, compare, evaluate); only the plumbing lives here.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError, OctavcalError
from .loading import first_line

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo


@dataclass
class Share:
    """This process's place in a group: ``rank`` of ``world``; ``group`` carries the status exchange."""

    rank: int
    world: int
    group: Any = None  # None: the default process group
    timeout_s: float | None = None

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def gather(self, doing: str, produce: Callable[[], T]) -> list[T]:
        """``produce()`` on every rank, gathered in rank order. When any rank raised, every rank raises
        DistributedError naming the first that failed and its error."""
        error, payload, original = None, None, None
        try:
            payload = produce()
        except Exception as exc:
            error, original = _described(exc), exc
        gathered: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(gathered, (error, payload), group=self.group)
        except Exception as exc:  # a rank died (gloo: connection closed) or the timeout passed
            wait = f"the {self.timeout_s:g} s timeout" if self.timeout_s else "the process group's timeout"
            raise DistributedError(
                f"Rank {self.rank} of {self.world} stopped while {doing}: another rank was killed or did not "
                f"answer within {wait} ({_backend_message(exc)})."
            ) from (original or exc)
        failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
        if failed:
            rank, message = failed[0]
            others = f" (ranks {', '.join(str(r) for r, _ in failed[1:])} failed too)" if failed[1:] else ""
            raise DistributedError(
                f"Rank {rank} of {self.world} failed while {doing}: {message}{others}"
            ) from original
        return [p for _, p in gathered]

    def each_batch(
        self,
        items: Iterable[T],
        step: Callable[[int, T], None],
        work: SharedWork | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Run ``step(i, item)`` for this rank's items of the global stream (i % world == rank), in
        rounds of ``world`` items with a status exchange after each; returns the global count."""
        stream = iter(items)
        done = 0

        def one_round(start: int) -> tuple[int, list[tuple[str, bool]]]:
            if work is not None:
                work.run()
            chunk = list(itertools.islice(stream, self.world))  # every rank reads every item
            if self.rank < len(chunk):
                step(start + self.rank, chunk[self.rank])
            return len(chunk), work.offered() if work is not None else []

        while True:
            statuses = self.gather("running batches", functools.partial(one_round, done))
            counts = [c for c, _ in statuses]
            if len(set(counts)) > 1:
                raise DistributedError(
                    f"The ranks read different numbers of batches after batch {done} ({counts} in this "
                    "round, by rank): every rank must be given the same batches."
                )
            if work is not None:
                work.settle([offers for _, offers in statuses])
            done += counts[0]
            if progress is not None and counts[0]:
                progress(done)
            if counts[0] < self.world:
                return done


@dataclass
class SharedWork:
    """Work met while running batches that one rank does once (a weight's scales).

    Ranks offer keys during a round; when the round's status is exchanged, each new key goes to one of
    the ranks that met it: in turn, or with ``first`` to the one that met it in the lowest global batch
    (a weight computed from the data must be the single-process run's first one).
    """

    rank: int
    do: Callable[[Any], None]
    pending: dict[str, tuple[bool, Any]] = field(default_factory=dict)
    assigned: set[str] = field(default_factory=set)
    owned: list[Any] = field(default_factory=list)
    given: int = 0

    def offer(self, key: str, payload: Any, first: bool) -> None:
        if key not in self.assigned and key not in self.pending:
            self.pending[key] = (first, payload)

    def offered(self) -> list[tuple[str, bool]]:
        return [(key, first) for key, (first, _) in self.pending.items()]

    def settle(self, offers: list[list[tuple[str, bool]]]) -> None:
        met: dict[str, tuple[bool, list[int]]] = {}
        for rank, keys in enumerate(offers):  # rank order is global batch order within a round
            for key, first in keys:
                if key not in self.assigned:
                    met.setdefault(key, (first, []))[1].append(rank)
        for key, (first, ranks) in met.items():
            owner = ranks[0] if first else ranks[self.given % len(ranks)]
            self.given += 1
            self.assigned.add(key)
            if owner == self.rank:
                self.owned.append(self.pending[key][1])
        self.pending.clear()

    def run(self) -> None:
        while self.owned:
            self.do(self.owned.pop(0))


def share_of(group: Any = None) -> Share | None:
    """The Share of ``group`` (a process group, or a Share as it is), else of an initialized default
    process group of more than one process; None for a single process."""
    if isinstance(group, Share):
        return group
    if group is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return Share(dist.get_rank(), dist.get_world_size(), _status_group())
    if dist.get_world_size(group) == 1:
        return None
    return Share(dist.get_rank(group), dist.get_world_size(group), group)


_status_groups: dict[int, Any] = {}


def _status_group() -> Any:
    """The status exchange goes over gloo (CPU) even when the default group is NCCL: object
    collectives then need no device, and a timeout raises instead of aborting the process."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    key = id(world)
    if key not in _status_groups:
        _status_groups[key] = dist.new_group(backend="gloo")
    return _status_groups[key]


@contextmanager
def joined(backend: str | None, timeout_s: float) -> Iterator[Share | None]:
    """Join the default process group when launched as one of several processes (torchrun's
    ``WORLD_SIZE`` > 1): gloo on CPU, NCCL with CUDA, or ``backend``; leave it at the end."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) <= 1:
        yield None
        return
    if timeout_s <= 0:
        raise DistributedError(f"The timeout must be positive: got {timeout_s:g} seconds.")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:
        raise DistributedError(
            f"Could not join the process group of {world} processes ({backend}, from RANK, WORLD_SIZE, "
            f"MASTER_ADDR and MASTER_PORT): {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    try:
        share = share_of()
        if share is not None:
            share.timeout_s = timeout_s
        yield share
    finally:
        _status_groups.clear()
        dist.destroy_process_group()


@contextmanager
def together(share: Share | None, doing: str) -> Iterator[None]:
    """Run the block on every rank; afterwards all ranks go on, or all raise the first failure."""
    if share is None:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as exc:
        failure = exc
    if failure is None:
        share.gather(doing, lambda: None)
        return

    def fail() -> None:
        raise failure

    share.gather(doing, fail)


def _backend_message(exc: BaseException) -> str:
    """gloo's 'Connection closed by peer [127.0.0.1]:40838', without its source path and advice."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first_line(exc))
    return text.split(". This is typically", 1)[0].rstrip(".")


def _described(exc: BaseException) -> str:
    if isinstance(exc, OctavcalError):
        return str(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"

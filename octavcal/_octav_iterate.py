"""OCTAV's iteration (eq. 6) for every row at once: one state object and one function per rule.

The passes over the data are in ``_octav_kernels.py``; the public solver is ``octav.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ._octav_kernels import Stats, excess_and_count, smallest_above

# Every row stops at a proven fixed point; rows this long may also stop on a contraction estimate.
SMOOTH_ROW = 1 << 16
# The contraction estimate's density of values near the root counts at least this many crossings.
_MIN_CROSSINGS = 16
# ... and doubles the measured density for safety.
_DENSITY_SAFETY = 2
# A count between the last two evaluations is "as predicted" by the pair before when it is at most
# twice that pair's density times the gap, plus a few values of slack ...
_PREDICTED_FACTOR = 2
_PREDICTED_SLACK = 8
# ... and only once the pair has shrunk to a quarter of the one before.
_SHRINK = 0.25
# The estimate's geometric series needs a contraction rate well below 1.
_MAX_RHO = 0.5
# Long rows take Newton steps on log E(s) while the map still moves s by more than this (relative).
_TAIL_STEP = 1e-3


@dataclass(slots=True)
class IterationState:
    """Per-row bookkeeping, a handful of length-R vectors on the host (NumPy does it in microseconds,
    where each tiny torch op would cost more than a pass over a small tensor).

    The bracket [lo, hi] holds the root of h(s) = c s N0 - E, with N1 and eq. (6)'s map at both ends.
    """

    nnz: np.ndarray  # non-zero magnitudes per row
    s: np.ndarray  # the point evaluated next
    lo: np.ndarray
    hi: np.ndarray
    above_lo: np.ndarray  # N1 at the bracket's ends
    above_hi: np.ndarray
    map_lo: np.ndarray  # eq. (6) there
    map_hi: np.ndarray
    done: np.ndarray
    counts: np.ndarray  # evaluations per row, int64
    prev_s: np.ndarray  # the previous evaluation: its point, N1, and whether h < 0 there
    prev_above: np.ndarray
    prev_below: np.ndarray
    prev_density: np.ndarray  # values per unit of s between the two evaluations before
    prev_gap: np.ndarray  # and the distance between them
    from_map: np.ndarray  # s is the map's value at the previous evaluation
    pending: np.ndarray  # rows whose bracket holds one data point (see finish_point_masses)

    @classmethod
    def start(cls, stats: Stats, s0: np.ndarray) -> IterationState:
        """The bracket [0, max] (eq. (6) at 0 is the paper's s_1); all-zero rows are done at once."""
        rows, nnz = stats.nnz.size, stats.nnz
        done = nnz == 0
        hi = stats.smax.copy()
        return cls(
            nnz=nnz,
            s=np.where(done, hi, s0),
            lo=np.zeros(rows),
            hi=hi,
            above_lo=nnz.copy(),
            above_hi=np.zeros(rows),
            map_lo=stats.total / np.maximum(nnz, 1),
            map_hi=np.zeros(rows),
            done=done,
            counts=np.zeros(rows, dtype=np.int64),
            prev_s=np.full(rows, np.nan),
            prev_above=np.full(rows, np.nan),
            prev_below=np.zeros(rows, dtype=bool),
            prev_density=np.full(rows, np.nan),
            prev_gap=np.full(rows, np.nan),
            from_map=np.zeros(rows, dtype=bool),
            pending=np.zeros(rows, dtype=bool),
        )


class Evaluation(NamedTuple):
    """One pass at the state's s: E, N1, N0 and eq. (6)'s value (``newton``) per row."""

    excess: np.ndarray
    above: np.ndarray
    inside: np.ndarray
    newton: np.ndarray


def evaluate(
    x: torch.Tensor,
    signed: bool,
    c: float,
    state: IterationState,
    work: torch.Tensor,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> Evaluation:
    """E(s) and N1(s) of the rows still moving (``known``: already measured), and eq. (6) there.

    The iterate s <- (E + s N1) / (c N0 + N1) is the Newton step towards the root of h(s).
    """
    rows = x.shape[0]
    active = np.flatnonzero(~state.done)
    if known is not None:
        excess, above = known
    else:
        # Finished channels drop out: later iterations read only the few rows still moving.
        subset = None if active.size == rows else torch.from_numpy(active).to(x.device)
        sub_excess, sub_above = excess_and_count(x, signed, state.s[active], work, subset)
        excess, above = np.zeros(rows), np.zeros(rows)
        excess[active], above[active] = sub_excess, sub_above
    inside = state.nnz - above
    newton = (excess + state.s * above) / np.where(state.done, 1.0, c * inside + above)
    state.counts[active] += 1
    return Evaluation(excess, above, inside, newton)


def literal_step(state: IterationState, ev: Evaluation) -> None:
    """The paper's recursion verbatim: s <- eq. (6), unguarded, for a fixed number of iterations.

    No bracket and no stopping rule: at a point mass (Appendix B) it cycles, as the paper's does.
    """
    state.s = np.where(state.done, state.s, ev.newton)


def exact_stop(state: IterationState, ev: Evaluation) -> np.ndarray:
    """Rows at the exact fixed point: s is the map's value at the previous point and no value lies
    between the two (the same count above both).

    The map is constant between consecutive data values, so it takes that same value at s: s is its
    fixed point. A small step alone proves nothing: a point mass between s and the map's value makes
    the step tiny (its values weigh in the denominator) far from the root.
    """
    return state.from_map & (ev.above == state.prev_above)


def tighten_bracket(state: IterationState, ev: Evaluation, below: np.ndarray) -> None:
    """Move the bracket's end on s's side to s: h increases strictly in s, so the sign of h(s)
    (``below``: h(s) < 0, the root lies above) tells which end. An init outside [0, max] must not
    widen the bracket, hence the comparisons with the ends."""
    tighter_lo = below & (state.s > state.lo)
    tighter_hi = ~state.done & ~below & (state.s < state.hi)
    state.lo, state.above_lo, state.map_lo = (
        np.where(tighter_lo, state.s, state.lo),
        np.where(tighter_lo, ev.above, state.above_lo),
        np.where(tighter_lo, ev.newton, state.map_lo),
    )
    state.hi, state.above_hi, state.map_hi = (
        np.where(tighter_hi, state.s, state.hi),
        np.where(tighter_hi, ev.above, state.above_hi),
        np.where(tighter_hi, ev.newton, state.map_hi),
    )


def contraction_stop(
    state: IterationState, ev: Evaluation, below: np.ndarray, step: np.ndarray, c: float, tol: float
) -> np.ndarray:
    """Long rows whose distance to the root is estimated within ``tol`` (relative); only rows of
    ``SMOOTH_ROW`` values or more, where the map is smooth at the scale of tol.

    Near the root the map g has slope -c s f / D (f: values per unit of s, D = c N0 + N1), so it
    contracts by rho = c s f / D per step and g(s) is off by at most rho step / (1 - rho) plus the
    curvature term f d^2 / (2 D) at a distance d ~ step. f is measured between the last two
    evaluations, doubled (``_DENSITY_SAFETY``) and taken as at least ``_MIN_CROSSINGS`` values there
    (fewer are too few to measure it); rho < ``_MAX_RHO`` keeps the series' bound meaningful.
    The estimate is trusted only when:
    - those two evaluations straddle the root, so that every value between s and the root was counted;
    - that count cannot hide a point mass or a tight cluster next to s: either all of them together
      move the map by less than tol, or there are no more of them than the density of the pair
      before predicts (``_PREDICTED_FACTOR`` times it, plus ``_PREDICTED_SLACK`` values), with the
      pair at most ``_SHRINK`` as wide as that one (a mass inside both pairs inflates the older
      density too: it stands out only once the pair has shrunk well below the one before);
    - one value between s and the root moves the map by less than tol: up to (c s + step) / D;
    - the map's value lies inside the bracket.
    Updates the density and gap of the pair for the next evaluation.
    """
    crossed = np.abs(ev.above - state.prev_above)
    gap = np.abs(state.s - state.prev_s)
    density = _DENSITY_SAFETY * np.maximum(crossed, _MIN_CROSSINGS) / gap
    slope = c * ev.inside + ev.above
    rho = c * state.s * density / slope
    error = rho * step / (1 - rho) + density * step**2 / (2 * slope)
    one_point = (c * state.s + step) / slope
    all_together = crossed * (c * state.s + gap + step) / slope
    as_predicted = (crossed <= _PREDICTED_FACTOR * state.prev_density * gap + _PREDICTED_SLACK) & (
        gap <= _SHRINK * state.prev_gap
    )
    estimated = (
        np.isfinite(error)
        & (below != state.prev_below)
        & ((all_together <= tol * ev.newton) | as_predicted)
        & (rho < _MAX_RHO)
        & (one_point <= tol * ev.newton)
        & (error <= tol * ev.newton)
    )
    state.prev_density = np.where(state.done, state.prev_density, crossed / gap)
    state.prev_gap = np.where(state.done, state.prev_gap, gap)
    return estimated & (ev.newton >= state.lo) & (ev.newton <= state.hi)


def tail_step(
    state: IterationState, ev: Evaluation, step: np.ndarray, converged: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """(use, point): a Newton step on log E(s) - log(c s N0) for long rows far from the root.

    Far from the root, h is concave (E(s) falls off like a tail), so the map creeps up from below
    and overshoots from above; the logarithms have the same root and follow tails closely. Used
    while it stays inside the bracket and the map still moves s by more than ``_TAIL_STEP``
    (relative). Near the root the map itself is better: its steps alternate sides, so the next
    evaluation straddles the root, and its own value can prove the fixed point. The map's value
    still decides convergence: the answer is the same fixed point.
    """
    s = state.s
    log_step = (np.log(ev.excess) - np.log(c * s * ev.inside)) / (ev.above / ev.excess + 1 / s)
    tail = s + log_step
    far = step > _TAIL_STEP * ev.newton
    use = far & np.isfinite(tail) & (tail > state.lo) & (tail < state.hi) & ~converged
    return use, tail


def bracketed_step(state: IterationState, ev: Evaluation, converged: np.ndarray) -> np.ndarray:
    """Eq. (6)'s value where it lands inside the bracket (or has converged), else bisection.

    An iterate that leaves the bracket (point masses, Appendix B, where the recursion cycles)
    would not approach the root; halving the bracket always does.
    """
    inside = (ev.newton > state.lo) & (ev.newton < state.hi)
    return np.where(inside | converged, ev.newton, 0.5 * (state.lo + state.hi))


def one_point_left(state: IterationState, converged: np.ndarray) -> np.ndarray:
    """Rows whose bracket (lo, hi] holds a single data point: finished by ``finish_point_masses``."""
    return ~state.done & ~converged & (state.above_lo - state.above_hi == 1)


def finish_point_masses(x: torch.Tensor, signed: bool, state: IterationState, work: torch.Tensor) -> None:
    """Exact answers for the ``pending`` rows, whose bracket (lo, hi] holds one data point v.

    The map is constant on [lo, v) and on [v, hi], so the root is its value on one side if that
    lands there, else h jumps over zero at v itself (Appendix B's point of positive mass, where the
    recursion would cycle). One pass finds v for all such rows.
    """
    which = np.flatnonzero(state.pending)
    idx = torch.from_numpy(which).to(x.device)
    v = smallest_above(x, signed, state.lo[which], work, idx)
    map_lo, map_hi = state.map_lo[which], state.map_hi[which]
    state.s[which] = np.where(map_lo < v, map_lo, np.where(map_hi >= v, map_hi, v))


def guarded_step(state: IterationState, ev: Evaluation, c: float, tol: float, smooth: bool) -> None:
    """One evaluation's worth of OCTAV with its guards: bracket, stopping rules, next point."""
    step = np.abs(ev.newton - state.s)
    below = ~state.done & (c * state.s * ev.inside < ev.excess)  # h(s) < 0: the root is above s
    converged = exact_stop(state, ev)
    tighten_bracket(state, ev, below)
    if smooth:
        converged |= contraction_stop(state, ev, below, step, c, tol)
        use_tail, tail = tail_step(state, ev, step, converged, c)
        nxt = np.where(use_tail, tail, bracketed_step(state, ev, converged))
    else:
        nxt = bracketed_step(state, ev, converged)
    single = one_point_left(state, converged)
    state.pending |= single  # resolved together after the loop: one pass for all such rows
    # A bracket narrower than tol holds the root (on a point mass, it is hi itself): take hi.
    collapsed = ~converged & ~single & (state.hi - state.lo <= tol * state.hi)
    nxt = np.where(collapsed, state.hi, nxt)
    state.prev_s, state.prev_above, state.prev_below = state.s, ev.above, below
    state.from_map = nxt == ev.newton
    state.s = np.where(state.done, state.s, nxt)
    state.done = state.done | converged | collapsed | single


def solve_rows(
    x: torch.Tensor,
    signed: bool,
    c: float,
    s0: np.ndarray,
    stats: Stats,
    *,
    tol: float,
    max_iter: int,
    iterations: int | None,
    work: torch.Tensor,
    first: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Solve eq. (6) for every row of ``x`` (R, n) from initial guesses ``s0`` (R,): (amax, iterations).

    With E(s) = sum(max(m - s, 0)) and N1, N0 the counts above s and in (0, s], the iterate of eq. (6)
    is the Newton step towards the root of h(s) = c s N0 - E, which increases strictly in s: each
    evaluation also brackets the root. ``iterations`` runs the literal recursion that many times
    (``literal_step``); otherwise ``guarded_step`` until every row stops. ``first``:
    ``excess_and_count`` at ``s0``, when the caller already has it.
    """
    state = IterationState.start(stats, s0)
    # The contraction estimate needs a map that is smooth at the scale of tol: many values per row.
    smooth = x.shape[1] >= SMOOTH_ROW
    with np.errstate(divide="ignore", invalid="ignore"):
        for iteration in range(iterations if iterations is not None else max_iter):
            ev = evaluate(x, signed, c, state, work, first if iteration == 0 else None)
            if iterations is not None:
                literal_step(state, ev)
                continue
            guarded_step(state, ev, c, tol, smooth)
            if state.done.all():
                break
    if state.pending.any():
        finish_point_masses(x, signed, state, work)
    return state.s, state.counts

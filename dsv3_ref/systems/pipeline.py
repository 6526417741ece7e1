"""Pipeline-parallel schedules as event simulations: 1F1B, ZB1P (zero bubble) and DualPipe (report §3.2.1, Table 2).
Notebook 90 teaches them.

The model is cut into `pp` stages of equal cost, one per rank (DualPipe: two per rank, one per direction); a batch
is split into `n_micro` micro-batches. Each rank runs a fixed order of operations (`ORDERS`), and an operation starts
as soon as its rank is free and its inputs exist (communication is free: Table 2 counts computation only). Op kinds
(`Durations`): F forward of one stage; B full backward; BI its input-gradient part (B - W) and W its weight-gradient
part (zero bubble, Qi et al. 2023; nothing downstream waits for W); an F&B pair of two micro-batches overlapped
(DualPipe), FB <= F + B. Micro-batch k's F on stage s needs its F on s - 1; its B/BI on s needs its F on s and the
input gradient from s + 1; W needs BI on the same rank.

`Schedule` measures the bubble (max over ranks of makespan - busy time, the reading under which Table 2 comes out),
the activation memory (micro-batch-stages in flight) and the parameter memory (stages per rank). Reproduced exactly
(tests/test_pipeline.py): 1F1B always; ZB1P's (pp-1)(F+B-2W) when W <= F and W <= B - W (the simulation gives
(pp-1) max(F+B-2W, B-W, F)); DualPipe's (pp/2-1)(F&B+B-3W) when B - W = F and W <= F, for FB in [B, F + B] and even
n_micro >= 2 pp; the memory columns always (DualPipe: 2x parameters, pp+1 activations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

METHODS = ("1F1B", "ZB1P", "DualPipe")

# Report Table 2 (DeepSeek-V3 §3.2.1): bubble, parameter memory, activation memory (in stage-activations per rank)
TABLE2 = {
    "1F1B": {"bubble": "(PP-1)(F+B)", "parameter": "1x", "activation": "PP"},
    "ZB1P": {"bubble": "(PP-1)(F+B-2W)", "parameter": "1x", "activation": "PP"},
    "DualPipe": {"bubble": "(PP/2-1)(F&B+B-3W)", "parameter": "2x", "activation": "PP+1"},
}


@dataclass(frozen=True)
class Durations:
    """Per-op durations (any time unit): F forward, B full backward, W its weight-gradient part (so the input-gradient
    part BI = B - W), FB an overlapped F&B pair (default F + B, i.e. no gain from overlapping)."""

    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None

    def __post_init__(self):
        for name in ("F", "B", "W"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"durations: {name} must be a positive number, got {value!r}")
        if self.W >= self.B:
            raise ValueError(f"durations: W ({self.W}) must be smaller than the full backward B ({self.B}), so that "
                             "the input-gradient part B - W is positive")
        if self.FB is None:
            object.__setattr__(self, "FB", self.F + self.B)
        lo, hi = max(self.F, self.B), self.F + self.B
        if isinstance(self.FB, bool) or not (isinstance(self.FB, (int, float)) and lo <= self.FB <= hi):
            raise ValueError(f"durations: FB (an overlapped F&B pair) must lie in [max(F, B), F + B] = [{lo}, {hi}], "
                             f"got {self.FB!r}")

    @property
    def BI(self) -> float:
        """The backward for the input gradient: B - W."""
        return self.B - self.W

    def duration(self, kind: str) -> float:
        """Duration of one op of `kind` ("F", "B", "BI", "W") run alone."""
        return {"F": self.F, "B": self.B, "BI": self.BI, "W": self.W}[kind]


class Op(NamedTuple):
    """One operation of a simulated schedule. An F&B pair is two Ops (an "F" and a "B") with the same rank, start and
    end and overlapped=True. direction 0 enters the pipeline at rank 0, direction 1 (DualPipe only) at rank pp-1;
    microbatch counts from 0 within its direction."""

    rank: int
    start: float
    end: float
    op: str
    microbatch: int
    direction: int
    overlapped: bool = False


# a step of a rank's order: one (kind, microbatch, direction) or two of them run as an F&B pair
Step = tuple[tuple[str, int, int], ...]


@dataclass
class Schedule:
    """A simulated schedule: `ops` sorted by (rank, start), and its metrics (bubble, activation, parameter memory)."""

    method: str
    pp: int
    n_micro: int
    durations: Durations
    ops: list[Op] = field(repr=False)

    @property
    def makespan(self) -> float:
        """Time from the first F to the last op of any rank: one training iteration."""
        return max(op.end for op in self.ops)

    def busy(self) -> list[float]:
        """Per rank: time spent computing (an F&B pair is counted once, for its FB duration)."""
        busy = [0.0] * self.pp
        for op in self.ops:
            if not (op.overlapped and op.op != "F"):  # count a pair through its F half only
                busy[op.rank] += op.end - op.start
        return busy

    def bubble_per_rank(self) -> list[float]:
        """Per rank: makespan - busy time."""
        return [self.makespan - b for b in self.busy()]

    @property
    def bubble(self) -> float:
        """The largest idle time of a rank in one iteration (the quantity of the report's Table 2)."""
        return max(self.bubble_per_rank())

    def peak_activations(self) -> list[int]:
        """Per rank: the most micro-batch-stages in flight at once (allocated when F starts, freed when B or W ends)."""
        events: list[list[tuple[float, int]]] = [[] for _ in range(self.pp)]
        for op in self.ops:
            if op.op == "F":
                events[op.rank].append((op.start, +1))
            elif op.op in ("B", "W"):
                events[op.rank].append((op.end, -1))
        peaks = []
        for ev in events:
            level = peak = 0
            for _, delta in sorted(ev):  # at equal times the frees (-1) come first
                level += delta
                peak = max(peak, level)
            peaks.append(peak)
        return peaks

    @property
    def activation_memory(self) -> int:
        """max over ranks of `peak_activations`, in one micro-batch's activations through one stage."""
        return max(self.peak_activations())

    @property
    def parameter_memory(self) -> int:
        """Model chunks (stages) held per rank, relative to 1F1B: 2 for DualPipe, else 1."""
        return 2 if self.method == "DualPipe" else 1

    def by_rank(self) -> list[list[Op]]:
        """The ops of each rank in time order (the data a timeline plot needs)."""
        rows: list[list[Op]] = [[] for _ in range(self.pp)]
        for op in self.ops:
            rows[op.rank].append(op)
        return rows


def table2_bubble(method: str, pp: int, durations: Durations) -> float:
    """The bubble formula of the report's Table 2 evaluated at `pp` and `durations`."""
    d = durations
    if method == "1F1B":
        return (pp - 1) * (d.F + d.B)
    if method == "ZB1P":
        return (pp - 1) * (d.F + d.B - 2 * d.W)
    if method == "DualPipe":
        return (pp / 2 - 1) * (d.FB + d.B - 3 * d.W)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def table2_memory(method: str, pp: int) -> tuple[int, int]:
    """Table 2's (parameter memory in x, activation memory in stage-activations) evaluated at `pp`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return (2, pp + 1) if method == "DualPipe" else (1, pp)


# ---------------------------------------------------------------------------------------------- per-rank orders
def order_1f1b(pp: int, n_micro: int) -> list[list[Step]]:
    """1F1B: rank r runs pp-1-r forwards, then (F, B) pairs in turn, then the remaining backwards."""
    orders = []
    for r in range(pp):
        warm = pp - 1 - r
        steps: list[Step] = [(("F", k, 0),) for k in range(warm)]
        for k in range(n_micro - warm):
            steps += [(("F", warm + k, 0),), (("B", k, 0),)]
        steps += [(("B", k, 0),) for k in range(n_micro - warm, n_micro)]
        orders.append(steps)
    return orders


def order_zb1p(pp: int, n_micro: int) -> list[list[Step]]:
    """ZB1P (ZB-H1): the 1F1B order with each B split into BI and W; rank r keeps r Ws deferred (first in, first
    out) and runs them after its last BI. At most pp micro-batches are then in flight on any rank, as in 1F1B."""
    orders = []
    for r in range(pp):
        warm = pp - 1 - r
        steps: list[Step] = [(("F", k, 0),) for k in range(warm)]
        deferred: list[int] = []
        for k in range(n_micro):
            if k + warm < n_micro:
                steps.append((("F", k + warm, 0),))
            steps.append((("BI", k, 0),))
            deferred.append(k)
            if len(deferred) > r:  # keep r weight passes for the end
                steps.append((("W", deferred.pop(0), 0),))
        steps += [(("W", k, 0),) for k in deferred]
        orders.append(steps)
    return orders


class _DualPipeRank:
    """The order of one DualPipe rank, built step by step: phase 0 is the direction that enters at the rank's nearer
    end (direction 0 on ranks < pp/2, direction 1 on the others), phase 1 the other one."""

    def __init__(self, pp: int, rank: int):
        self.flip = int(rank >= pp // 2)
        self.next_f, self.next_b = [0, 0], [0, 0]
        self.deferred: list[tuple[int, int]] = []  # (microbatch, direction) of weight passes not run yet

    def fwd(self, phase: int) -> tuple[str, int, int]:
        k = self.next_f[phase]
        self.next_f[phase] += 1
        return ("F", k, phase ^ self.flip)

    def bwd(self, phase: int, split: bool = False) -> tuple[str, int, int]:
        k = self.next_b[phase]
        self.next_b[phase] += 1
        if split:  # zero-bubble: input gradient now, weight gradient later (first in, first out)
            self.deferred.append((k, phase ^ self.flip))
            return ("BI", k, phase ^ self.flip)
        return ("B", k, phase ^ self.flip)

    def weight(self) -> tuple[str, int, int]:
        k, direction = self.deferred.pop(0)
        return ("W", k, direction)


def order_dualpipe(pp: int, n_micro: int) -> list[list[Step]]:
    """DualPipe: the order of deepseek-ai/DualPipe's `DualPipe.step` (`dualpipe/dualpipe.py`) for each rank.

    Micro-batches enter from both ends, half at rank 0 (direction 0) and half at rank pp-1 (direction 1), and run in
    order 0, 1, ..., n_micro/2 - 1 within a direction. Rank r holds stage r of direction 0 and stage pp-1-r of
    direction 1. With h = min(r, pp-1-r), n = pp/2, "0" the direction that enters at the rank's nearer end:
        1. 2(n-h-1) x F0                  5. (n-h-1) x (B1, F1&B0)
        2. (h+1) x (F0, F1)                6. (h+1) x (B1, B0), the second half split into BI with W deferred
        3. (n-h-1) x (BI1, W1, F1)         7. (n-h-1) x (W, BI0)
        4. (n_micro/2 - pp + h + 1) x (F0&B1, F1&B0)   8. (h+1) x W
    On the two middle ranks the first F0&B1 of step 4 runs as F0 then B1, not overlapped, as in the repository. The
    repository's batched send/receive calls, which can make a rank also wait for its next input, are not modelled.
    """
    return [_dualpipe_rank(pp, r, n_micro // 2) for r in range(pp)]


def _dualpipe_rank(pp: int, r: int, half: int) -> list[Step]:
    """Rank r's DualPipe order, h = min(r, pp-1-r), n = pp/2: the warm-up and main steps 1-5, then `_dualpipe_drain`."""
    n, h = pp // 2, min(r, pp - 1 - r)
    o, steps = _DualPipeRank(pp, r), []
    for _ in range(2 * (n - h - 1)):  # step 1: nF0
        steps.append((o.fwd(0),))
    for _ in range(h + 1):  # step 2: nF0F1
        steps += [(o.fwd(0),), (o.fwd(1),)]
    for _ in range(n - h - 1):  # step 3: nB1W1F1 (zero bubble: the W right after its BI)
        steps += [(o.bwd(1, split=True),), (o.weight(),), (o.fwd(1),)]
    for i in range(half - pp + h + 1):  # step 4, the main step: nF0B1F1B0
        if i == 0 and h == n - 1:  # the middle ranks do not overlap this pair ("to further reduce bubble size")
            steps += [(o.fwd(0),), (o.bwd(1),)]
        else:
            steps.append((o.fwd(0), o.bwd(1)))
        steps.append((o.fwd(1), o.bwd(0)))
    for _ in range(n - h - 1):  # step 5: nB1F1B0
        steps += [(o.bwd(1),), (o.fwd(1), o.bwd(0))]
    return steps + _dualpipe_drain(o, n, h)


def _dualpipe_drain(o: _DualPipeRank, n: int, h: int) -> list[Step]:
    """Steps 6-8 of a DualPipe rank: the last backward passes, half of them with deferred weight passes, then the
    deferred weight passes."""
    steps: list[Step] = []
    split = False
    for i in range(h + 1):  # step 6: nB1B0, its second half with deferred weight passes
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        steps.append((o.bwd(1, split),))
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        steps.append((o.bwd(0, split),))
    for _ in range(n - h - 1):  # step 7: nWB0
        steps += [(o.weight(),), (o.bwd(0, split=True),)]
    for _ in range(h + 1):  # step 8: nW
        steps.append((o.weight(),))
    return steps


ORDERS = {"1F1B": order_1f1b, "ZB1P": order_zb1p, "DualPipe": order_dualpipe}


# ---------------------------------------------------------------------------------------------- simulation
def _stage(pp: int, rank: int, direction: int) -> int:
    """The model stage that `rank` runs for `direction` (direction 1 runs the pipeline backwards)."""
    return rank if direction == 0 else pp - 1 - rank


def simulate_orders(pp: int, orders: list[list[Step]], durations: Durations) -> list[Op]:
    """Run per-rank orders as soon as possible: each step starts when its rank is free and its inputs exist.

    Raises RuntimeError if the orders deadlock (a step waits for something no rank will produce).
    """
    ready: dict[tuple[str, int, int, int], float] = {}  # (F | G | W, microbatch, direction, stage) -> time
    free, pos, ops = [0.0] * pp, [0] * pp, []

    def needs(kind: str, k: int, direction: int, stage: int) -> list[tuple[str, int, int, int]]:
        if kind == "F":
            return [("F", k, direction, stage - 1)] if stage > 0 else []
        if kind in ("B", "BI"):
            return [("F", k, direction, stage)] + ([("G", k, direction, stage + 1)] if stage < pp - 1 else [])
        return [("G", k, direction, stage)]  # W needs the input-gradient pass on its own stage

    progressed = True
    while progressed:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                step = orders[r][pos[r]]
                deps = [key for kind, k, d in step for key in needs(kind, k, d, _stage(pp, r, d))]
                if any(key not in ready for key in deps):
                    break
                start = max([free[r], *(ready[key] for key in deps)])
                end = start + (durations.FB if len(step) == 2 else durations.duration(step[0][0]))
                for kind, k, d in step:
                    stage = _stage(pp, r, d)
                    made = {"F": ["F"], "B": ["G", "W"], "BI": ["G"], "W": ["W"]}[kind]
                    for m in made:
                        if (m, k, d, stage) in ready:
                            raise RuntimeError(f"order runs {kind} of micro-batch {k} (direction {d}) twice")
                        ready[(m, k, d, stage)] = end
                    ops.append(Op(r, start, end, kind, k, d, len(step) == 2))
                free[r], pos[r], progressed = end, pos[r] + 1, True
    stuck = [r for r in range(pp) if pos[r] < len(orders[r])]
    if stuck:
        raise RuntimeError(f"schedule deadlocks: ranks {stuck} wait at steps "
                           f"{[orders[r][pos[r]] for r in stuck]}")
    return sorted(ops, key=lambda op: (op.rank, op.start, op.op))


def _check_schedule_args(method: str, pp: int, n_micro: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (isinstance(pp, int) and pp >= 1):
        raise ValueError(f"pp (pipeline ranks) must be a positive integer, got {pp!r}")
    if method == "DualPipe":
        if pp < 2 or pp % 2:
            raise ValueError(f"pp (pipeline ranks) must be even and >= 2 for DualPipe, got {pp}")
        if not (isinstance(n_micro, int) and n_micro % 2 == 0 and n_micro >= 2 * pp):
            raise ValueError(f"n_micro must be an even integer >= 2 * pp = {2 * pp} for DualPipe (half of the "
                             f"micro-batches enter from each end), got {n_micro!r}")
    elif not (isinstance(n_micro, int) and n_micro >= pp):
        raise ValueError(f"n_micro must be an integer >= pp = {pp} for {method} (to fill the pipeline), "
                         f"got {n_micro!r}")


def schedule(method: str, pp: int, n_micro: int, durations: Durations | None = None) -> Schedule:
    """Simulate `method` ("1F1B", "ZB1P" or "DualPipe") on `pp` ranks with `n_micro` micro-batches.

    n_micro counts all micro-batches (DualPipe: both directions together, n_micro/2 each), so every rank computes
    n_micro forwards and n_micro backwards of one stage in all three methods. Raises ValueError for an unknown
    method, pp < 1 (odd pp for DualPipe), n_micro < pp (DualPipe: odd or < 2 pp).
    """
    durations = Durations() if durations is None else durations
    if not isinstance(durations, Durations):
        raise ValueError(f"durations must be a Durations, got {type(durations).__name__}")
    _check_schedule_args(method, pp, n_micro)
    ops = simulate_orders(pp, ORDERS[method](pp, n_micro), durations)
    return Schedule(method, pp, n_micro, durations, ops)

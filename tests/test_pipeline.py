"""Pipeline schedules (dsv3_ref.systems.pipeline): dependencies, the report's Table 2 (bubble and memory), bad input."""

from collections import Counter, defaultdict

import pytest

from dsv3_ref.systems.pipeline import METHODS, TABLE2, Durations, schedule, table2_bubble, table2_memory

# (method, pp, n_micro, durations): equal and unequal op times, with and without an overlap gain
CASES = [
    (method, pp, n_micro, d)
    for method, pp, n_micro in [("1F1B", 1, 1), ("1F1B", 4, 4), ("1F1B", 4, 9), ("ZB1P", 1, 3), ("ZB1P", 4, 4),
                                ("ZB1P", 5, 11), ("ZB1P", 8, 20), ("DualPipe", 2, 4), ("DualPipe", 4, 8),
                                ("DualPipe", 6, 14), ("DualPipe", 8, 20)]
    for d in [Durations(1, 2, 1), Durations(1, 2, 1, FB=2.5), Durations(0.7, 3.1, 0.4, FB=3.3),
              Durations(2, 2.5, 1.5, FB=4)]
]


def _stage(op, pp):
    return op.rank if op.direction == 0 else pp - 1 - op.rank


@pytest.mark.parametrize("method,pp,n_micro,d", CASES)
def test_every_schedule_respects_the_dependencies(method, pp, n_micro, d):
    s = schedule(method, pp, n_micro, d)
    directions = (0, 1) if method == "DualPipe" else (0,)
    per_direction = n_micro // len(directions)
    at = {}  # (op, microbatch, direction, stage) -> Op
    for op in s.ops:
        key = (op.op, op.microbatch, op.direction, _stage(op, pp))
        assert key not in at, f"{key} runs twice"
        at[key] = op
        assert op.direction in directions and 0 <= op.microbatch < per_direction
        expected = d.FB if op.overlapped else d.duration(op.op)
        assert op.end - op.start == pytest.approx(expected)
    split = "BI" if method == "ZB1P" else None
    for k in range(per_direction):
        for dr in directions:
            for st in range(pp):
                f = at[("F", k, dr, st)]
                if st > 0:  # forward: after the same micro-batch's F on the previous stage
                    assert f.start >= at[("F", k, dr, st - 1)].end
                # a full B, or (ZB1P, some DualPipe backwards) an input-gradient BI and a later W on the same rank
                b = at.get(("B", k, dr, st)) or at[("BI", k, dr, st)]
                if split == "BI":
                    assert b.op == "BI"
                assert b.rank == f.rank and b.start >= f.end
                if st < pp - 1:  # backward: after the input gradient of the next stage
                    nxt = at.get(("B", k, dr, st + 1)) or at[("BI", k, dr, st + 1)]
                    assert b.start >= nxt.end
                if b.op == "BI":
                    w = at[("W", k, dr, st)]
                    assert w.rank == b.rank and w.start >= b.end
                else:
                    assert ("W", k, dr, st) not in at
    n_backward = sum(op.op in ("B", "BI") for op in s.ops)
    assert n_backward == sum(op.op == "F" for op in s.ops) == pp * n_micro  # every stage, every micro-batch


@pytest.mark.parametrize("method,pp,n_micro,d", CASES)
def test_no_rank_runs_two_ops_at_once_except_the_f_and_b_pairs(method, pp, n_micro, d):
    s = schedule(method, pp, n_micro, d)
    slots = defaultdict(list)  # (rank, start, end, overlapped) -> ops
    for op in s.ops:
        slots[(op.rank, op.start, op.end, op.overlapped)].append(op)
    intervals = defaultdict(list)
    for (rank, start, end, overlapped), ops in slots.items():
        if overlapped:  # an explicit F&B pair: one forward and one full backward, of two micro-batch streams
            assert method == "DualPipe"
            assert sorted(op.op for op in ops) == ["B", "F"]
            assert end - start == pytest.approx(d.FB)
        else:
            assert len(ops) == 1
        intervals[rank].append((start, end))
    for rank, spans in intervals.items():
        spans.sort()
        for (_, e0), (s1, _) in zip(spans[:-1], spans[1:], strict=True):
            assert s1 >= e0 - 1e-12, f"rank {rank}: ops overlap"


@pytest.mark.parametrize("pp", [1, 2, 4, 8])
@pytest.mark.parametrize("n_micro_extra", [0, 1, 12])
@pytest.mark.parametrize("F,B,W", [(1, 2, 1), (1, 3, 0.5), (2, 3, 1), (0.5, 2, 1.5)])
def test_1f1b_bubble_is_table2(pp, n_micro_extra, F, B, W):
    d = Durations(F, B, W)
    s = schedule("1F1B", pp, pp + n_micro_extra, d)
    assert s.bubble_per_rank() == pytest.approx([table2_bubble("1F1B", pp, d)] * pp)
    assert s.bubble == pytest.approx((pp - 1) * (F + B))


@pytest.mark.parametrize("pp", [2, 4, 5, 8])
@pytest.mark.parametrize("n_micro_extra", [0, 3, 12])
@pytest.mark.parametrize("F,B,W", [(1, 2, 1), (1, 3, 1), (2, 3, 1), (1, 2, 0.5), (1.5, 4, 0.75)])
def test_zb1p_bubble_is_table2_when_w_fits(pp, n_micro_extra, F, B, W):
    # Table 2's regime: W <= F and W <= B - W (the first rank's wait and the last rank's start-up are filled)
    d = Durations(F, B, W)
    s = schedule("ZB1P", pp, pp + n_micro_extra, d)
    assert s.bubble_per_rank() == pytest.approx([table2_bubble("ZB1P", pp, d)] * pp)
    assert s.bubble == pytest.approx((pp - 1) * (F + B - 2 * W))


@pytest.mark.parametrize("F,B,W", [(0.5, 3, 1), (1, 1.5, 1), (1, 3, 2), (0.25, 2, 1.5)])
def test_zb1p_bubble_outside_that_regime(F, B, W):
    # the simulation's general result, (pp-1) max(F+B-2W, B-W, F): larger than Table 2's formula here
    pp, d = 6, Durations(F, B, W)
    s = schedule("ZB1P", pp, 15, d)
    assert s.bubble == pytest.approx((pp - 1) * max(F + B - 2 * W, B - W, F))
    assert s.bubble > table2_bubble("ZB1P", pp, d)


@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("n_micro_over", [0, 2, 8])  # n_micro = 2 pp + n_micro_over (8 ranks + 4: Figure 5's 20)
@pytest.mark.parametrize("F,W", [(1, 1), (1, 0.5), (2, 1), (1, 0.25)])
@pytest.mark.parametrize("overlap_gain", [0.0, 0.5, 1.0])  # FB = F + B - gain * F
def test_dualpipe_bubble_is_table2(pp, n_micro_over, F, W, overlap_gain):
    # Table 2's regime: the input-gradient backward B - W takes as long as F, and W <= F
    B = F + W
    d = Durations(F, B, W, FB=F + B - overlap_gain * F)
    s = schedule("DualPipe", pp, 2 * pp + n_micro_over, d)
    assert s.bubble == pytest.approx(table2_bubble("DualPipe", pp, d))
    assert s.bubble == pytest.approx((pp / 2 - 1) * (d.FB + B - 3 * W))
    middle = s.bubble_per_rank()[pp // 2 - 1: pp // 2 + 1]
    assert middle == pytest.approx([s.bubble] * 2)  # the middle ranks carry the maximum
    if overlap_gain == 0.0:  # without an overlap gain every rank idles the same
        assert s.bubble_per_rank() == pytest.approx([s.bubble] * pp)


def test_dualpipe_bubble_outside_that_regime_is_not_the_formula():
    # documented in the module docstring: the simulation can be below or above Table 2's value
    assert schedule("DualPipe", 8, 20, Durations(1, 3, 1, FB=4)).bubble == pytest.approx(11)
    assert schedule("DualPipe", 8, 20, Durations(1, 2.5, 1.5, FB=3.5)).bubble == pytest.approx(6)
    assert table2_bubble("DualPipe", 8, Durations(1, 3, 1, FB=4)) == pytest.approx(12)
    assert table2_bubble("DualPipe", 8, Durations(1, 2.5, 1.5, FB=3.5)) == pytest.approx(4.5)


def test_figure5_example_and_the_ranking_of_bubbles():
    # 8 ranks, 20 micro-batches (10 per direction); every rank computes 20 forwards and 20 backwards of one stage
    d = Durations(1, 2, 1, FB=2.5)
    runs = {m: schedule(m, 8, 20, d) for m in METHODS}
    dp = runs["DualPipe"]
    for rank_ops in dp.by_rank():
        kinds = Counter((op.op, op.direction) for op in rank_ops)
        for direction in (0, 1):
            assert kinds[("F", direction)] == 10
            assert kinds[("B", direction)] + kinds[("BI", direction)] == 10
    assert [runs[m].bubble for m in METHODS] == pytest.approx([21, 7, 4.5])
    assert runs["1F1B"].makespan == pytest.approx(20 * 3 + 21)


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_memory_columns_of_table2(pp):
    d = Durations(1, 2, 1, FB=2.5)
    one_f_one_b = schedule("1F1B", pp, 3 * pp, d)
    assert one_f_one_b.peak_activations() == [pp - r for r in range(pp)]  # rank r holds pp - r micro-batches
    for method, n_micro in [("1F1B", 3 * pp), ("ZB1P", 3 * pp), ("DualPipe", 2 * pp), ("DualPipe", 3 * pp)]:
        s = schedule(method, pp, n_micro, d)
        assert (s.parameter_memory, s.activation_memory) == table2_memory(method, pp)
    assert schedule("ZB1P", pp, 3 * pp, d).peak_activations() == [pp] * pp  # deferred Ws use 1F1B's spare room
    assert schedule("DualPipe", pp, 3 * pp, d).peak_activations() == [pp + 1] * pp
    assert TABLE2["DualPipe"] == {"bubble": "(PP/2-1)(F&B+B-3W)", "parameter": "2x", "activation": "PP+1"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="DualPipe", pp=7, n_micro=14), "even"),
    (dict(method="DualPipe", pp=8, n_micro=14), "n_micro"),
    (dict(method="DualPipe", pp=4, n_micro=9), "n_micro"),
    (dict(method="1F1B", pp=4, n_micro=3), "n_micro"),
    (dict(method="ZB1P", pp=8, n_micro=7), "n_micro"),
    (dict(method="ZB1P", pp=0, n_micro=4), "pp"),
    (dict(method="ZB1P", pp=2.0, n_micro=4), "pp"),
    (dict(method="GPipe", pp=4, n_micro=8), "method"),
])
def test_bad_schedule_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(F=0), "F must be a positive"), (dict(B=-1), "B must be a positive"), (dict(W=0), "W must be a positive"),
    (dict(F="1"), "F must be"), (dict(B=2, W=2), "W"), (dict(FB=1.5), "FB"), (dict(FB=3.5), "FB"),
])
def test_bad_durations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Durations(**{"F": 1, "B": 2, "W": 1, **kwargs})


def test_bad_table_and_durations_type_raise():
    with pytest.raises(ValueError, match="method"):
        table2_bubble("2F2B", 4, Durations())
    with pytest.raises(ValueError, match="method"):
        table2_memory("2F2B", 4)
    with pytest.raises(ValueError, match="durations"):
        schedule("1F1B", 4, 8, durations=(1, 2, 1))

"""Which tensors share a batch (mergebuild/execute/batching.py)."""

from __future__ import annotations

from mergebuild.execute import batching
from mergebuild.execute.batching import Batch, group_small
from mergebuild.methods.registry import get_method
from mergebuild.planning.planner import CACHED, DIRTY, TensorTask

WS, TIES, DARE = get_method("weighted_sum"), get_method("ties"), get_method("dare")


def task(name, shape=(8,), method=WS, params=None, dtype="F16", state=DIRTY, **extra):
    inputs = (("a", name), ("b", name))
    return TensorTask(name, dtype, shape, inputs, method, params or {"alpha": 0.5}, state=state, **extra)


def same_dtypes(t):
    return ["F16"] * len(t.inputs)


def names(units):
    return [[t.name for t in u.tasks] if isinstance(u, Batch) else u.name for u in units]


def test_small_tasks_of_one_signature_share_a_batch_after_the_others():
    tasks = [task("w1", (320, 320)), task("b1"), task("n1"), task("w2", (640, 320)), task("b2")]
    assert names(group_small(tasks, same_dtypes)) == ["w1", "w2", ["b1", "n1", "b2"]]


def test_signatures_split_batches():
    tasks = [
        task("x1", params={"alpha": 0.5}), task("y1", params={"alpha": 0.25}),
        task("x2", params={"alpha": 0.5}), task("y2", params={"alpha": 0.25}),
        task("f1", dtype="F32"), task("f2", dtype="F32"),
    ]
    assert names(group_small(tasks, same_dtypes)) == [["x1", "x2"], ["y1", "y2"], ["f1", "f2"]]
    mixed = {"m1": ["F16", "F32"], "m2": ["F16", "F16"]}
    tasks = [task("m1"), task("m2")]
    assert names(group_small(tasks, lambda t: mixed[t.name])) == ["m1", "m2"]


def test_what_never_batches():
    tasks = [
        task("big", (batching.SMALL + 1,)),
        task("ties", method=TIES, params={"density": 0.2}),  # per-tensor top-k
        task("dare", method=DARE, params={"density": 0.2}),  # random stream per key
        task("clip", clip=True),
        task("inpaint", channels=4),
        task("cached", state=CACHED),
        task("empty", (0,)),
        task("alone"),
    ]
    assert names(group_small(tasks, same_dtypes)) == [t.name for t in tasks]


def test_a_full_batch_is_emitted_where_it_fills(monkeypatch):
    monkeypatch.setattr(batching, "BATCH", 20)
    tasks = [task(f"t{i}") for i in range(5)] + [task("big", (batching.SMALL + 1,))]
    assert names(group_small(tasks, same_dtypes)) == [["t0", "t1"], ["t2", "t3"], "big", "t4"]


def test_spans_follow_the_members():
    batch = Batch([task("a", (2, 3)), task("b", (4,)), task("c", ())], 11)
    assert [(t.name, begin, n) for t, begin, n in batch.spans()] == [("a", 0, 6), ("b", 6, 4), ("c", 10, 1)]
    assert batch.nbytes == 22


def test_an_open_batch_goes_once_enough_other_bytes_passed(monkeypatch):
    """So the output's data hash, which follows the writes in file order, is not held back."""
    monkeypatch.setattr(batching, "LAG", 1000)
    tasks = [task("s1"), task("s2"), task("big", (batching.SMALL + 1,)), task("s3"), task("s4")]
    assert names(group_small(tasks, same_dtypes)) == ["big", ["s1", "s2"], ["s3", "s4"]]

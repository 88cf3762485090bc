"""The row alignment of vocab = ... merges (methods/vocab_rows.py) on hand-written matrices."""

from __future__ import annotations

import torch

from mergebuild.methods.registry import get_method
from mergebuild.methods.vocab_rows import PARAM, Rows, align_rows, aligned


def test_rows_are_taken_filled_from_the_first_input_or_averaged():
    a = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # tokens x, y
    b = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])  # tokens y, z, w
    c = torch.tensor([[100.0, 100.0], [300.0, 300.0]])  # tokens z, v
    # output rows: x y z w v, and one padding row (the first input has no row 5: zero)
    rows = Rows(
        rows=6,
        src=((0, 1, -1, -1, -1, -1), (-1, 0, 1, 2, -1, -1), (-1, -1, 0, -1, 1, -1)),
        fill_rows=(0, 1, 2, 3, 4, 5),
        contrib=((0, 1, -1, -1, -1, -1), (-1, -1, 1, 2, -1, -1), (-1, -1, 0, -1, 1, -1)),
    )
    ya, yb, yc = align_rows([a, b, c], rows)
    z = (20.0 + 100.0) / 2  # in b and c, not the first input: their mean
    assert ya.tolist() == [[1, 1], [2, 2], [z, z], [30, 30], [300, 300], [0, 0]]
    assert yb.tolist() == [[1, 1], [10, 10], [20, 20], [30, 30], [300, 300], [0, 0]]
    assert yc.tolist() == [[1, 1], [2, 2], [100, 100], [30, 30], [300, 300], [0, 0]]


def test_the_wrapped_method_sees_aligned_rows_and_its_own_parameters():
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[5.0], [7.0], [9.0]])
    rows = Rows(rows=3, src=((1, 0, -1), (0, 1, 2)), fill_rows=(2,), contrib=((-1,), (2,)))
    method = aligned(get_method("weighted_sum"), rows, None, clip=False)
    out = method.fn(a, b, alpha=0.25, **{PARAM: "digest"})
    assert out.tolist() == [[0.75 * 2 + 0.25 * 5], [0.75 * 1 + 0.25 * 7], [9.0]]
    assert method.name == "weighted_sum" and not method.elementwise
    first = aligned(get_method("copy"), rows, (0,), clip=False)
    assert first.fn(a, b, **{PARAM: "digest"}).tolist() == [[2.0], [1.0], [9.0]]


def test_clip_clamps_to_the_aligned_inputs():
    a, b = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    rows = Rows(rows=1, src=((0,), (0,), (0,)), fill_rows=(), contrib=((), (), ()))
    add = aligned(get_method("add_difference"), rows, None, clip=True)
    assert add.fn(a, b, a, alpha=3.0, **{PARAM: "d"}).tolist() == [[1.0]]  # 3.0, clamped to [0, 1]

"""One way to write parameters everywhere (golden cases), and output that is never cut: the
console is full width off a terminal, wraps in one."""

from __future__ import annotations

import io

from mergebuild.planning.recipe import changes, params_text, rules_text, value_text
from mergebuild.render.console import FullWidthConsole, lineage_tree

GOLDEN = [
    (0.4, "0.4"),
    (1, "1"),
    ({"IN05": 0.2, "default": 0.5, "BASE": 0.0, "OUT11": 1, "M00": 0.3, "IN10": 0.1},
     "{default = 0.5, BASE = 0.0, IN05 = 0.2, IN10 = 0.1, M00 = 0.3, OUT11 = 1}"),
    ([0.0, 0.1, 0.2], "[0.0, 0.1, 0.2]"),
    ([i / 10 for i in range(12)], "[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]"),
    ("GRAD_V", "GRAD_V"),
    ({"gradient": [0.0, 1.0], "default": 0.5}, "{default = 0.5, gradient = [0.0, 1.0]}"),
    (None, "unset"),
]


def test_values_are_written_one_way():
    for value, text in GOLDEN:
        assert value_text(value) == text, value


def test_parameters_rules_and_changes_share_that_writing():
    params = {"alpha": {"IN05": 0.65, "default": 0.5}, "te": 0.5}
    assert params_text(params) == "alpha={default = 0.5, IN05 = 0.65}, te=0.5"
    assert rules_text([{}]) == "1 rule" and rules_text([{}, {}]) == "2 rules" and rules_text([]) == ""
    old = {"kind": "merge", "method": "weighted_sum", "version": 1, "params": {"alpha": {"default": 0.5, "IN05": 0.6}}}
    new = {**old, "params": {"alpha": {"default": 0.5, "IN05": 0.65}}}
    assert changes("mbw", old, new) == ["mbw.alpha IN05: 0.6 -> 0.65"]


def test_off_a_terminal_nothing_is_cropped_or_wrapped():
    buffer = io.StringIO()
    console = FullWidthConsole(file=buffer, highlight=False, soft_wrap=True)
    long = "x" * 300
    tree = lineage_tree({"kind": "model", "file": "out.safetensors", "made_by": {
        "kind": "merge", "name": "final", "method": "weighted_sum", "params": {"alpha": long}, "inputs": []}})
    console.print(tree)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].endswith(long + ")") and "…" not in buffer.getvalue()


def test_on_a_terminal_the_width_is_the_terminals():
    console = FullWidthConsole(file=io.StringIO(), force_terminal=True, width=80)
    assert console.size.width == 80

"""The Mergefile contract: what parses, and the located errors for what does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebuild.errors import MergefileError
from mergebuild.planning.graph import build_graph, build_order
from mergebuild.mergefile.parse import parse_mergefile

GOOD = """
[settings]
cache = "c"
device = "cpu"
compute_dtype = "float64"
[models.base]
path = "m/base.safetensors"
[models.other]
path = "m/other.safetensors"
[merges.mix]
method = "weighted_sum"
inputs = ["base", "other"]
alpha = 1
[merges.out]
method = "copy"
inputs = ["mix"]
output = "o/out.safetensors"
dtype = "bfloat16"
"""


def parse(text: str):
    return parse_mergefile(text, Path("/p/mergefile.toml"))


def test_a_good_mergefile():
    mf = parse(GOOD)
    assert mf.settings.cache == Path("/p/c") and mf.settings.compute_dtype == "float64"
    assert mf.models["base"].path == Path("/p/m/base.safetensors")
    assert mf.merges["mix"].params == {"alpha": 1} and mf.merges["mix"].output is None
    assert mf.targets == ["out"] and mf.merges["out"].dtype == "bfloat16"
    g = build_graph(mf)
    assert build_order(mf, g, ["out"]) == ["base", "other", "mix", "out"]
    assert build_order(mf, g, ["mix"]) == ["base", "other", "mix"]
    assert mf.settings.staging == 256 * 10**6


@pytest.mark.parametrize("value, staging", [('"64MB"', 64 * 10**6), ('"1.5GB"', 15 * 10**8), ("4096", 4096)])
def test_staging_sizes(value, staging):
    assert parse(GOOD.replace('device = "cpu"', f"staging = {value}")).settings.staging == staging


@pytest.mark.parametrize("edit, table, field, words", [
    (("[settings]", "[setings]"), None, "setings", "did you mean 'settings'"),
    (('device = "cpu"', 'device = "tpu"'), "settings", "device", "not auto, cpu, mps, cuda"),
    (('device = "cpu"', 'staging = "-1MB"'), "settings", "staging", "a size such as"),
    (('path = "m/base.safetensors"', 'file = "m/base.safetensors"'), "models.base", "file", "unknown field"),
    (('method = "copy"', 'method = 3'), "merges.out", "method", "non-empty string"),
    (('inputs = ["mix"]', 'inputs = "mix"'), "merges.out", "inputs", "list of model or merge names"),
    (("alpha = 1", "alpha = true"), "merges.mix", "alpha", "expected float"),
    (('discard = "x"' if False else 'dtype = "bfloat16"', 'discard = "("'), "merges.out", "discard", "regular expression"),
    (("[merges.mix]", "[merges.base]"), "merges.base", None, "also a model"),
    (('output = "o/out.safetensors"', 'output = "m/base.safetensors"'), "merges.out", "output", "also [models.base]"),
])
def test_errors_name_table_and_field(edit, table, field, words):
    with pytest.raises(MergefileError) as info:
        parse(GOOD.replace(*edit))
    err = info.value
    assert (err.table, err.field) == (table, field)
    assert words in str(err) and str(err).startswith("/p/mergefile.toml")


def test_cycle_is_printed():
    text = GOOD.replace('inputs = ["base", "other"]', 'inputs = ["base", "out"]')
    with pytest.raises(MergefileError, match=r"cycle: (mix -> out -> mix|out -> mix -> out)"):
        build_graph(parse(text))

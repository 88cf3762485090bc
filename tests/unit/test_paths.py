"""Paths as users write them mean the same on every system, and names Windows cannot create are
refused everywhere (a Mergefile written on Linux must work on a friend's Windows machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergebuild.errors import MergefileError
from mergebuild.mergefile import parse_mergefile

pytestmark = pytest.mark.portable

TEXT = """
[settings]
cache = "{cache}"
[models.a]
path = "{source}"
[models.b]
path = "b.safetensors"
[merges.m]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.5
output = "{output}"
"""


def parse(source="models/a.safetensors", output="out/m.safetensors", cache="cache"):
    return parse_mergefile(TEXT.format(source=source, output=output, cache=cache), Path("/p/mergefile.toml"))


def test_backslashes_separate_folders_everywhere():
    mf = parse(source="models\\\\sd\\\\a.safetensors", output="out\\\\m.safetensors")
    assert mf.models["a"].path == Path("/p/models/sd/a.safetensors")
    assert mf.merges["m"].output == Path("/p/out/m.safetensors")


@pytest.mark.skipif(os.name == "nt", reason="drive letters are absolute there")
@pytest.mark.parametrize("where", ["source", "output", "cache"])
def test_a_drive_letter_path_is_refused_off_windows(where):
    value = {"source": "C:/models/a.safetensors", "output": "D:\\\\out\\\\m.safetensors", "cache": "//server/share/c"}[where]
    with pytest.raises(MergefileError) as info:
        parse(**{where: value})
    assert "is a Windows path" in str(info.value)


@pytest.mark.parametrize("output, words", [
    ("aux.safetensors", "Windows reserves the name AUX"),
    ("out/CON", "Windows reserves the name CON"),
    ("out/com1.merged.safetensors", "Windows reserves the name COM1"),
    ("out/lpt9/x.safetensors", "Windows reserves the name LPT9"),
    ("out/final:v2.safetensors", "Windows does not allow ':'"),
    ("out/what?.safetensors", "Windows does not allow '?'"),
    ("out/dir./m.safetensors", "trailing dot or space"),
    ("out/m ", "trailing dot or space"),
])
def test_names_windows_cannot_create_are_refused_everywhere(output, words):
    with pytest.raises(MergefileError) as info:
        parse(output=output)
    assert (info.value.table, info.value.field) == ("merges.m", "output") and words in str(info.value)


def test_ordinary_names_pass():
    for name in ("out/console.safetensors", "out/aux-merged.safetensors", "Qwen2.5-7B-merged", "../elsewhere/x.safetensors"):
        parse(output=name)


def test_float64_on_mps_is_refused():
    text = TEXT.format(source="a.safetensors", output="m.safetensors", cache="cache").replace(
        'cache = "cache"', 'cache = "cache"\ndevice = "mps"\ncompute_dtype = "float64"')
    with pytest.raises(MergefileError) as info:
        parse_mergefile(text, Path("/p/mergefile.toml"))
    assert "MPS (Apple silicon) has no float64" in str(info.value)

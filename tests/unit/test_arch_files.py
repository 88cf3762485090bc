"""Architectures are data: each file loads with fields of the right kinds, no architecture is
named in the package's code, and docs/blocks.md is what the files say."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mergebuild.layouts.blocks import ARCHS, architectures, detect

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mergebuild"


def test_every_file_is_an_architecture_with_its_fields():
    files = sorted(ARCHS.glob("*.json"))
    assert {p.stem for p in files} == set(architectures())
    for path in files:
        doc = json.loads(path.read_text())
        assert doc["name"] == path.stem
    for arch in architectures().values():
        assert arch.description and isinstance(arch.components, dict)
        assert len(set(arch.blocks)) == len(arch.blocks), arch.name
        assert all(block in arch.blocks for block in arch.aliases.values()), arch.name
        assert not set(arch.groups) & set(arch.blocks), arch.name
        if arch.blocks:
            assert arch.default_block is not None and arch.rules, arch.name
    assert [a for a in architectures().values() if a.is_fallback] == [architectures()["generic"]]


def test_no_architecture_is_named_in_the_code():
    names = set(architectures())
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(re.escape(n) for n in names))
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "testing" in path.relative_to(PACKAGE).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if pattern.search(line) or re.search(r"arch\.name\s*[!=]=", line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


def test_the_blocks_page_is_current():
    spec = importlib.util.spec_from_file_location("blocks_doc", ROOT / "scripts/blocks_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs/blocks.md").read_text() == module.render(), "run python scripts/blocks_doc.py"


@pytest.mark.parametrize("name", [n for n, a in architectures().items() if a.detect])
def test_each_detection_is_its_own(name):
    """The keys each alternative asks for are detected as that architecture (not an earlier one)."""
    arch = architectures()[name]
    for alternative in arch.detect:
        keys = [p + "weight" for p in alternative]
        assert detect(keys)[0].name == name, alternative

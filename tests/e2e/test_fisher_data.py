"""A Fisher computed from data (`[models.x] fisher_of = ...`): the numbers against a float64
brute force, the cache key (model, scripts and the project modules they import, or a declared
version), user scripts run only when the Fisher is dirty, and hostile scripts as one line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import build_json, mergefile, run_cli, write_model

SCRIPT = """
import os
from helpers import data

def loss(state, batch):
    x, y = batch
    pred = x @ state["layers.0.weight"].T + state["layers.0.bias"]
    return ((pred - y) ** 2).mean()

def batches():
    with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
        f.write("batches\\n")
    x, y = data()
    for i in range(x.shape[0]):
        yield x[i:i + 1], y[i:i + 1]
"""

HELPERS = """
import torch

def data():
    g = torch.Generator().manual_seed(5)
    return torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g)
"""

MERGEFILE = """
[models.ft1]
path = "ft1.safetensors"
[models.ft2]
path = "ft2.safetensors"
[models.f1]
fisher_of = "ft1"
loss = "train.py:loss"
batches = "train.py:batches"
samples = {samples}
{extra}
[models.f2]
fisher_of = "ft2"
loss = "train.py:loss"
batches = "train.py:batches"
samples = {samples}
{extra}
[merges.merged]
method = "fisher"
inputs = ["ft1", "ft2", "f1", "f2"]
output = "out/merged.safetensors"
"""


def _model(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.weight": torch.randn(1, 4, generator=g), "layers.0.bias": torch.randn(1, generator=g),
            "step": torch.tensor([seed])}


def _project(tmp_path: Path, samples: int = 12, extra: str = "", script: str = SCRIPT) -> Path:
    for i in (1, 2):
        write_model(tmp_path / f"ft{i}.safetensors", _model(i))
    (tmp_path / "train.py").write_text(textwrap.dedent(script))
    (tmp_path / "helpers.py").write_text(textwrap.dedent(HELPERS))
    (tmp_path / "unrelated.py").write_text("X = 1\n")
    mergefile(tmp_path / "mergefile.toml", MERGEFILE.format(samples=samples, extra=extra))
    return tmp_path


def _dry(tmp_path: Path) -> str:
    proc = run_cli("-n", "-v", cwd=tmp_path)
    return proc.stdout + proc.stderr


def _calls(tmp_path: Path) -> int:
    path = tmp_path / "calls.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _reference_fisher(state: dict, samples: int) -> dict:
    """Per-sample gradients written out by hand: pred = w.x + b, loss = (pred - y)^2."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 4, generator=g).double(), torch.randn(12, 1, generator=g).double()
    w, b = state["layers.0.weight"].double(), state["layers.0.bias"].double()
    fw, fb = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(samples):
        residual = (x[i] @ w.T + b - y[i])  # [1]
        fw += (2 * residual[:, None] * x[i][None, :]) ** 2
        fb += (2 * residual) ** 2
    return {"layers.0.weight": fw / samples, "layers.0.bias": fb / samples}


def test_fisher_merge_matches_a_float64_brute_force(tmp_path):
    _project(tmp_path, samples=10)
    build_json(cwd=tmp_path)
    out = load_file(str(tmp_path / "out" / "merged.safetensors"))
    models = [_model(1), _model(2)]
    fishers = [_reference_fisher(m, 10) for m in models]
    for key in ("layers.0.weight", "layers.0.bias"):
        num = sum(f[key].clamp(min=1e-8) * m[key].double() for f, m in zip(fishers, models))
        den = sum(f[key].clamp(min=1e-8) for f in fishers)
        torch.testing.assert_close(out[key].double(), num / den, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["step"], models[0]["step"])  # not a float: the first model's


def test_scripts_run_only_when_the_fisher_is_dirty(tmp_path):
    _project(tmp_path)
    build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 2  # one per Fisher
    doc = build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 2 and doc["merges"]["merged"]["computed"] == 0
    (tmp_path / "unrelated.py").write_text("X = 2\n")  # imported by nothing
    build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 2
    dry = _dry(tmp_path)
    assert "up to date" in dry
    (tmp_path / "helpers.py").write_text(textwrap.dedent(HELPERS) + "# a comment\n")  # imported by train.py
    dry = _dry(tmp_path)
    assert "f1, f2 to compute" in dry and "script helpers.py changed" in dry
    assert "f1 (the Fisher of ft1): dirty" in dry
    doc = build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 4
    assert doc["merges"]["merged"]["computed"] == 0  # the same Fisher: early cutoff


def test_a_new_model_recomputes_its_fisher_only(tmp_path):
    _project(tmp_path)
    build_json(cwd=tmp_path)
    changed = _model(1)
    changed["layers.0.bias"] += 1
    write_model(tmp_path / "ft1.safetensors", changed)
    doc = build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 3  # f1 again, not f2
    assert doc["merges"]["merged"]["computed"] == 2


def test_a_declared_version_stands_for_the_scripts(tmp_path):
    _project(tmp_path, extra='version = "v1"')
    build_json(cwd=tmp_path)
    (tmp_path / "helpers.py").write_text(textwrap.dedent(HELPERS) + "# edited\n")
    build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 2  # the user said nothing changed
    text = (tmp_path / "mergefile.toml").read_text().replace('version = "v1"', 'version = "v2"')
    (tmp_path / "mergefile.toml").write_text(text)
    assert "models.f1.version: v1 -> v2" in _dry(tmp_path)
    build_json(cwd=tmp_path)
    assert _calls(tmp_path) == 4


def test_lineage_shows_the_computed_fisher(tmp_path):
    _project(tmp_path)
    build_json(cwd=tmp_path)
    tree = run_cli("lineage", "out/merged.safetensors", cwd=tmp_path, check=True).stdout
    assert "f1: fisher_of(samples=12, loss=train.py:loss, batches=train.py:batches)" in tree
    doc = json.loads(run_cli("lineage", "out/merged.safetensors", "--json", cwd=tmp_path, check=True).stdout)
    methods = json.dumps(doc)
    assert '"method": "fisher_of"' in methods


@pytest.mark.parametrize("script, field, code, message", [
    (None, "loss", 2, "script not found"),
    ("def batches():\n    return []\n", "loss", 2, "defines no function 'loss' (it defines batches)"),
    ("def loss(:\n", "loss", 2, "syntax error"),
    (SCRIPT.replace("return ((pred", "raise ValueError('bad batch')\n    return ((pred"), "", 1,
     "loss (train.py:loss) on batch 0 raised ValueError: bad batch"),
    (SCRIPT.replace("return ((pred - y) ** 2).mean()", "return ((pred - y) ** 2).mean() * 1e20"), "", 1,
     "holds NaN or Inf"),
    (SCRIPT.replace(".mean()", ".expand(2, 1)"), "", 1, "it must return a scalar tensor"),
    (SCRIPT.replace("x.shape[0]", "3"), "", 1, "yielded 3 batches, fewer than samples = 12"),
    (SCRIPT + "\nraise RuntimeError('no GPU here')\n", "", 1, "running train.py raised RuntimeError: no GPU here"),
])
def test_hostile_scripts_are_one_line(tmp_path, script, field, code, message):
    _project(tmp_path, script=script or SCRIPT)
    if script is None:
        (tmp_path / "train.py").unlink()
    proc = run_cli("-q", cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "[models.f1]" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "merged.safetensors").exists()


def test_mergefile_errors_name_the_field(tmp_path):
    _project(tmp_path)
    text = (tmp_path / "mergefile.toml").read_text()
    for bad, words in ((text.replace('fisher_of = "ft1"', 'fisher_of = "ft9"'), "unknown model 'ft9'"),
                       (text.replace("samples = 12", "samples = 0", 1), "samples"),
                       (text.replace('loss = "train.py:loss"', 'loss = "train.loss"', 1), "script.py:function"),
                       (text.replace('fisher_of = "ft1"', 'fisher_of = "f2"'), "is itself computed")):
        (tmp_path / "mergefile.toml").write_text(bad)
        proc = run_cli("-n", cwd=tmp_path)
        assert proc.returncode == 2 and words in proc.stderr and "[models.f1]" in proc.stderr, proc.stderr


def test_a_copy_merge_writes_the_fisher_to_a_file(tmp_path):
    _project(tmp_path, samples=10)
    with open(tmp_path / "mergefile.toml", "a") as f:
        f.write('\n[merges.f1_file]\nmethod = "copy"\ninputs = ["f1"]\noutput = "out/f1.safetensors"\n')
    build_json(cwd=tmp_path)
    saved = load_file(str(tmp_path / "out" / "f1.safetensors"))
    reference = _reference_fisher(_model(1), 10)
    assert set(saved) == set(reference)  # the float tensors only
    for key, value in reference.items():
        torch.testing.assert_close(saved[key].double(), value, rtol=1e-5, atol=1e-7)
    assert _calls(tmp_path) == 2  # f1 computed once, read by both merges


def test_planning_a_fisher_never_imports_torch(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT, SIM

    _project(tmp_path)
    build_json(cwd=tmp_path)
    (tmp_path / "helpers.py").write_text(textwrap.dedent(HELPERS) + "# dirty now\n")
    code = ("import sys; from mergebuild.cli import main; "
            "rc = main(['-n', '-q']); print(rc, 'torch._C' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SIM)])})
    assert proc.stdout.split() == ["0", "False"], proc.stderr
    assert _calls(tmp_path) == 2  # planning read the scripts, never ran them

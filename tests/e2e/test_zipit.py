"""zipit through the real CLI on fabricated MLPs and data files: a permuted copy zips back into
the model itself, full and partial zips are the paper's formulas on a float64 statistic, the
statistic is cached by the weights' and the data's digests (a script's content), and data or
models that do not fit are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebuild.methods.zipit_match import zip_features
from mergebuild.testing import digits
from tests.conftest import load, mergefile, run_cli, write_model

SIZES = (8, 16, 12, 4)

MERGEFILE = """
[settings]
compute_dtype = "{dtype}"
[models.a]
path = "a.safetensors"
[models.b]
path = "b.safetensors"

[merges.zip]
method = "zipit"
inputs = ["a", "b"]
data = "{data}"
{extra}
output = "out/zip.safetensors"
"""


def mlp(seed: int, sizes=SIZES) -> dict:
    state = digits.init_mlp(sizes, seed)
    return {k: (v + 0.1 if k.endswith("bias") else v).contiguous() for k, v in state.items()}  # few dead units


def permuted_copy(state: dict, seed: int) -> dict:
    """The same function with every hidden layer's units shuffled."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    last = digits.layer_count(state) - 1
    for i in range(last):
        perm = torch.randperm(state[f"layers.{i}.bias"].shape[0], generator=gen)
        out[f"layers.{i}.weight"] = out[f"layers.{i}.weight"][perm].contiguous()
        out[f"layers.{i}.bias"] = out[f"layers.{i}.bias"][perm].contiguous()
        out[f"layers.{i + 1}.weight"] = out[f"layers.{i + 1}.weight"][:, perm].contiguous()
    return out


def inputs(rows=300, width=SIZES[0], seed=0):
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def project(tmp_path, a, b, data=None, dtype="float32", source="inputs.safetensors", extra=""):
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    if data is not None:
        digits.save_inputs(data, tmp_path / "inputs.safetensors")
    mergefile(tmp_path / "mergefile.toml", MERGEFILE.format(dtype=dtype, data=source, extra=extra))


@pytest.fixture
def counted(monkeypatch):
    """How many times the zip matching ran (the statistic's compute), per layer."""
    from mergebuild.methods import zipit_match

    calls = []
    real = zipit_match.zip_features
    monkeypatch.setattr(zipit_match, "zip_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("extra", ["alpha = 0\nbeta = 0", "alpha = 0\nbeta = 0\npartial = 1"])
def test_a_permuted_copy_zips_back_into_the_model(tmp_path, extra):
    a = mlp(1)
    project(tmp_path, a, permuted_copy(a, 2), inputs(), extra=extra)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "out/zip.safetensors")
    x = inputs(50, seed=7)
    if "partial" in extra:
        assert sorted(k for k in out if not k.startswith("heads.")) == ["layers.0.bias", "layers.0.weight"]
        for name, logits in digits.forward_heads(out, x).items():
            torch.testing.assert_close(logits, digits.forward(a, x), atol=1e-5, rtol=1e-5)
        assert sorted(digits.heads(out)) == ["a", "b"]
    else:
        assert sorted(out) == sorted(a)
        torch.testing.assert_close(digits.forward(out, x), digits.forward(a, x), atol=1e-5, rtol=1e-5)


def reference(a: dict, b: dict, x, zipped: int, alpha: float, beta: float):
    """(M, U) per zipped layer from a float64 run of both models, numpy only."""
    feats = {0: [], 1: []}
    for side, state in enumerate((a, b)):
        h = x.numpy().astype(np.float64)
        for i in range(zipped):
            w, b = (state[f"layers.{i}.{leaf}"].double().numpy() for leaf in ("weight", "bias"))
            h = np.maximum(h @ w.T + b, 0)
            feats[side].append(h)
    return [zip_features(np.corrcoef(np.hstack([feats[0][i], feats[1][i]]), rowvar=False), alpha, beta)
            for i in range(zipped)]


def zipped_layer(a, b, i, mats):
    """W_i = M_A W_A U_A + M_B W_B U_B (U of the layer before; identity for the first)."""
    m, _ = mats[i]
    n = m.shape[0]
    wa, wb = a[f"layers.{i}.weight"].double().numpy(), b[f"layers.{i}.weight"].double().numpy()
    if i:
        u = mats[i - 1][1]
        wa, wb = wa @ u[:u.shape[1]], wb @ u[u.shape[1]:]
    weight = m[:, :n] @ wa + m[:, n:] @ wb
    bias = m[:, :n] @ a[f"layers.{i}.bias"].double().numpy() + m[:, n:] @ b[f"layers.{i}.bias"].double().numpy()
    return weight, bias


@pytest.mark.parametrize("extra", ['head = "concat"', 'head = "average"\nalpha = 0.3\nbeta = 0.125', "partial = 2"])
def test_full_and_partial_zips_are_the_formulas_on_a_float64_statistic(tmp_path, extra):
    a, b, x = mlp(1), mlp(2), inputs()
    project(tmp_path, a, b, x, dtype="float64", extra=extra)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "out/zip.safetensors")
    alpha, beta = (0.3, 0.125) if "alpha" in extra else (0.5, 1.0)
    zipped = 2  # both hidden layers: full zipping, and partial = 2 of the three layers
    mats = reference(a, b, x, zipped, alpha, beta)
    for i in range(zipped):
        weight, bias = zipped_layer(a, b, i, mats)
        np.testing.assert_allclose(out[f"layers.{i}.weight"].double().numpy(), weight, atol=1e-5)
        np.testing.assert_allclose(out[f"layers.{i}.bias"].double().numpy(), bias, atol=1e-5)
    u = mats[-1][1]
    ua, ub = u[:u.shape[1]], u[u.shape[1]:]
    wa, wb = (s["layers.2.weight"].double().numpy() for s in (a, b))
    if "partial" in extra:
        np.testing.assert_allclose(out["heads.a.layers.2.weight"].double().numpy(), wa @ ua, atol=1e-5)
        np.testing.assert_allclose(out["heads.b.layers.2.weight"].double().numpy(), wb @ ub, atol=1e-5)
        assert torch.equal(out["heads.b.layers.2.bias"], b["layers.2.bias"])
    elif "concat" in extra:
        np.testing.assert_allclose(out["layers.2.weight"].double().numpy(), np.vstack([wa @ ua, wb @ ub]), atol=1e-5)
        assert torch.equal(out["layers.2.bias"], torch.cat([a["layers.2.bias"], b["layers.2.bias"]]))
    else:
        np.testing.assert_allclose(out["layers.2.weight"].double().numpy(), (wa @ ua + wb @ ub) / 2, atol=1e-5)


def test_the_statistic_is_cached_by_the_weights_and_the_datas_digests(tmp_path, counted):
    a, b, x = mlp(1), mlp(2), inputs()
    project(tmp_path, a, b, x, extra='head = "concat"')
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 2  # one matching per zipped layer
    assert "statistic zipit.matching: cached" in run_cli("-n", "-v", cwd=tmp_path, check=True).stdout
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 2

    project(tmp_path, a, b, extra='head = "average"')  # the output layer only: the matching stands
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 2 and load(tmp_path / "out/zip.safetensors")["layers.2.weight"].shape[0] == SIZES[-1]

    digits.save_inputs(x.clone(), tmp_path / "inputs.safetensors")  # rewritten, same bytes: same digest
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 2

    for change in (lambda: digits.save_inputs(inputs(seed=1), tmp_path / "inputs.safetensors"),
                   lambda: project(tmp_path, a, b, extra="alpha = 0.2"),
                   lambda: write_model(tmp_path / "b.safetensors", mlp(3))):
        before = len(counted)
        change()
        assert "statistic zipit.matching: dirty" in run_cli("-n", "-v", cwd=tmp_path, check=True).stdout
        run_cli(cwd=tmp_path, check=True)
        assert len(counted) == before + 2


BATCHES = """
import torch

def batches():
    x = torch.load({path!r})
    for i in range(0, x.shape[0], 64):
        yield x[i:i + 64], torch.zeros(min(64, x.shape[0] - i))  # (inputs, labels): labels ignored
"""


def test_a_script_of_batches_is_the_same_data_and_its_content_is_the_digest(tmp_path, counted):
    a, b, x = mlp(1), mlp(2), inputs()
    project(tmp_path, a, b, x)
    run_cli(cwd=tmp_path, check=True)
    from_file = load(tmp_path / "out/zip.safetensors")
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "batches.py").write_text(BATCHES.format(path=str(tmp_path / "x.pt")))
    project(tmp_path, a, b, source="batches.py:batches")
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 4
    for key, value in load(tmp_path / "out/zip.safetensors").items():
        torch.testing.assert_close(value, from_file[key], atol=1e-6, rtol=1e-6)
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 4
    (tmp_path / "batches.py").write_text(BATCHES.format(path=str(tmp_path / "x.pt")) + "# edited\n")
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 6


HELPED = """
import torch
from helpers import rows

def batches():
    yield rows()
"""


def test_editing_a_module_the_script_imports_recomputes_the_statistic_with_the_new_code(tmp_path, counted):
    a, b, x, y = mlp(1), mlp(2), inputs(seed=0), inputs(seed=5)
    torch.save(x, tmp_path / "x.pt")
    torch.save(y, tmp_path / "y.pt")
    (tmp_path / "batches.py").write_text(HELPED)
    (tmp_path / "helpers.py").write_text(f"import torch\ndef rows():\n    return torch.load({str(tmp_path / 'x.pt')!r})\n")
    project(tmp_path, a, b, source="batches.py:batches")
    run_cli(cwd=tmp_path, check=True)
    from_x = load(tmp_path / "out/zip.safetensors")
    (tmp_path / "helpers.py").write_text(f"import torch\ndef rows():\n    return torch.load({str(tmp_path / 'y.pt')!r})\n")
    assert "statistic zipit.matching: dirty" in run_cli("-n", "-v", cwd=tmp_path, check=True).stdout
    run_cli(cwd=tmp_path, check=True)
    assert len(counted) == 4  # two layers' matching, twice
    from_y = load(tmp_path / "out/zip.safetensors")
    digits.save_inputs(y, tmp_path / "inputs.safetensors")  # the same data as a file: the reference
    project(tmp_path, a, b, source="inputs.safetensors")
    run_cli(cwd=tmp_path, check=True)
    reference = load(tmp_path / "out/zip.safetensors")
    assert any(not torch.allclose(from_x[k], reference[k]) for k in reference)
    for key, value in reference.items():
        torch.testing.assert_close(from_y[key], value, atol=1e-6, rtol=1e-6)


def _garbage(tmp_path):
    (tmp_path / "inputs.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _two_tensors(tmp_path):
    digits.save({"x": inputs(), "y": inputs()}, tmp_path / "inputs.safetensors")


def _script(text):
    return lambda tmp_path: (tmp_path / "batches.py").write_text(text)


CASES = {
    "missing data": (None, {}, "file not found"),
    "garbage data": (_garbage, {}, "is not a safetensors file"),
    "two tensors": (_two_tensors, {}, "none is named 'inputs'"),
    "narrow data": (lambda p: digits.save_inputs(inputs(width=5), p / "inputs.safetensors"), {},
                    "has 5 features per sample; the model's first layer takes 8"),
    "other widths": (None, {"b": (8, 16, 10, 4)}, "zipit merges two models of the same shape"),
    "partial too deep": (None, {"extra": "partial = 3"}, "partial = 3"),
    "not a chain": (None, {"a_extra": {"layers.0.scale": torch.ones(16)}}, "neither a weight nor a bias"),
    "data with a NaN": (lambda p: digits.save_inputs(inputs().index_fill_(0, torch.tensor([3]), float("nan")),
                                                     p / "inputs.safetensors"), {}, "holds NaN or Inf"),
    "script without the function": (_script("def other():\n    return []\n"), {"source": "batches.py:batches"},
                                    "defines no function 'batches'"),
    "script batches of the wrong width": (_script("import torch\ndef batches():\n    yield torch.ones(4, 3)\n"),
                                          {"source": "batches.py:batches"},
                                          "expected floating-point inputs [samples, 8]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_data_and_models_that_do_not_fit_are_one_line_and_exit_2(tmp_path, case):
    make, how, fragment = CASES[case]
    a = {**mlp(1), **how.get("a_extra", {})}
    b = mlp(2, how.get("b", SIZES))
    project(tmp_path, a, b, source=how.get("source", "inputs.safetensors"), extra=how.get("extra", ""))
    if make is not None:
        make(tmp_path)
    elif "data" not in case:
        digits.save_inputs(inputs(), tmp_path / "inputs.safetensors")
    for args in (("-n",), ()):
        proc = run_cli(*args, cwd=tmp_path)
        if case.startswith(("script batches", "data with a NaN")) and args:  # found when the data is read
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert fragment in proc.stderr, proc.stderr
    assert not (tmp_path / "out/zip.safetensors").exists()


def test_a_script_that_raises_fails_the_build_in_one_line(tmp_path):
    project(tmp_path, mlp(1), mlp(2), source="batches.py:batches")
    (tmp_path / "batches.py").write_text("def batches():\n    raise RuntimeError('no dataset here')\n")
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "RuntimeError: no dataset here" in proc.stderr, proc.stderr


def test_data_that_changes_after_planning_is_refused(tmp_path):
    from mergebuild.errors import BuildError
    from mergebuild.methods.zipit_data import data_digest, input_batches

    digits.save_inputs(inputs(), tmp_path / "inputs.safetensors")
    digest = data_digest("inputs.safetensors", tmp_path, SIZES[0])
    assert [b.shape for b in input_batches("inputs.safetensors", str(tmp_path), digest, SIZES[0], "merges.zip")] \
        == [(300, SIZES[0])]
    digits.save_inputs(inputs(seed=3), tmp_path / "inputs.safetensors")  # rewritten between planning and compute
    with pytest.raises(BuildError, match="changed during the build"):
        list(input_batches("inputs.safetensors", str(tmp_path), digest, SIZES[0], "merges.zip"))


def test_status_says_the_data_changed_when_only_the_data_did(tmp_path):
    a, b = mlp(1), mlp(2)
    project(tmp_path, a, b, inputs())
    run_cli(cwd=tmp_path, check=True)
    digits.save_inputs(inputs(seed=3), tmp_path / "inputs.safetensors")  # same size, other rows
    proc = run_cli("status", cwd=tmp_path)
    assert proc.returncode == 0 and "zip: zipit.matching data changed (" in proc.stdout, proc.stdout
    assert "another recipe" not in proc.stdout

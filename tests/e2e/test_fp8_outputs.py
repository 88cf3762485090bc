"""float8 outputs through the real CLI on real safetensors files: a merge written as float8
equals the float64 computation clamped to the format's range and cast, bit for bit; float8
inputs are merged in the compute dtype; the dtype is part of every tensor's cache key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mergebuild import api
from tests.conftest import build_json, load, mergefile, run_cli, small_model, write_model

FLOAT8 = {"float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3", 448.0),
          "float8_e5m2": (torch.float8_e5m2, "F8_E5M2", 57344.0)}
BIG_KEY = "model.diffusion_model.middle_block.1.proj_out.weight"  # 90000 elements: computed alone, in chunks
MERGED = ("model.", "first_stage_model.")  # the SD keys weighted_sum merges (A1111: "model" in the name)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def saturated_cast(x64, name: str):
    """The independent expectation: clamp to the format's range in float64, then torch's cast."""
    dtype, _, top = FLOAT8[name]
    return x64.clamp(-top, top).to(dtype)


def same(x, y) -> bool:
    """Equal dtype, shape and bytes (NaN == NaN, -0 != 0)."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.is_floating_point() else torch.equal(x, y)


def header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


def few_bit_pair(shape, g):
    """A, B of the same binade (within 2), with 6-bit mantissas, from 2^-22 to 2^19: 0.75 A + 0.25 B
    is exact in float32 and float64 alike, so the build's float32 lerp and the float64 reference
    agree before the cast; many results lie exactly halfway between float8 values (ties), some
    beyond both formats' maxima, some below their smallest subnormals (flushed to 0)."""
    e = torch.randint(-22, 14, shape, generator=g).double()
    d = torch.randint(-2, 3, shape, generator=g).double()
    ma = torch.randint(-63, 64, shape, generator=g).double()
    mb = torch.randint(-63, 64, shape, generator=g).double()
    return (ma * torch.exp2(e)).float(), (mb * torch.exp2(e + d)).float()


def two_models(tmp_path: Path) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(11)
    a = small_model(1, dtype=torch.float32, extra={BIG_KEY: torch.zeros(300, 300)})
    b = dict(a)
    for key, t in a.items():
        if t.is_floating_point() and key.startswith(MERGED):
            a[key], b[key] = few_bit_pair(t.shape, g)
    a["model.diffusion_model.mask"] = torch.tensor([True, False, True])  # bool: never cast
    b["model.diffusion_model.mask"] = torch.tensor([False, False, True])
    b["v_pred"] = torch.zeros(0)  # a marker only B has: kept as it is
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    return a, b


def weighted_sum(tmp_path: Path, dtype: str) -> Path:
    return mergefile(tmp_path / "mergefile.toml", f"""
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "b"]
        alpha = 0.25
        dtype = "{dtype}"
        output = "m.safetensors"
    """)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FLOAT8))
def test_weighted_sum_to_float8_is_the_float64_result_saturated(tmp_path, name, device):
    a, b = two_models(tmp_path)
    weighted_sum(tmp_path, name)
    run_cli("--device", device, cwd=tmp_path, check=True)
    out, head = load(tmp_path / "m.safetensors"), header(tmp_path / "m.safetensors")
    _, code, top = FLOAT8[name]
    for key, t in a.items():
        if key.startswith(MERGED) and t.is_floating_point():
            expected = saturated_cast(0.75 * t.double() + 0.25 * b[key].double(), name)
        elif t.is_floating_point():  # not merged (alphas_cumprod): A's, cast
            expected = saturated_cast(t.double(), name)
        else:
            expected = t
        assert same(out[key], expected), key
        assert head[key]["dtype"] == {torch.float32: code, torch.int64: "I64", torch.bool: "BOOL"}[t.dtype]
    assert out["v_pred"].dtype == torch.float32 and out["v_pred"].shape == (0,)
    big = out[BIG_KEY].float()
    assert (big == top).any() and (big == -top).any() and torch.isfinite(big).all()  # saturated, both signs
    assert (big == 0).any() and (big[big != 0].abs().min() < 2.0**-6)  # flushed to 0, and subnormals


def test_a_model_converted_to_float8_with_copy(tmp_path):
    model = small_model(3)  # float16
    model[BIG_KEY] = torch.tensor([60000.0, -65504.0, 1.0, 2.0**-17, -2.0**-20] * 20000, dtype=torch.float16)
    write_model(tmp_path / "a.safetensors", model)
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a.safetensors"
        [merges.fp8]
        method = "copy"
        inputs = ["a"]
        dtype = "float8_e5m2"
        output = "fp8.safetensors"
    """)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "fp8.safetensors")
    for key, t in model.items():
        expected = saturated_cast(t.double(), "float8_e5m2") if t.is_floating_point() else t
        assert same(out[key], expected), key
    assert out[BIG_KEY][:5].float().tolist() == [57344.0, -57344.0, 1.0, 0.0, -0.0]  # torch's cast: inf, -inf
    assert math.copysign(1.0, out[BIG_KEY][4].item()) == -1.0


def test_changing_the_float8_dtype_recomputes_every_tensor(tmp_path):
    two_models(tmp_path)
    mf = weighted_sum(tmp_path, "float8_e4m3fn")
    keys = {n: t.key for n, t in api.plan(mf).merges["m"].tasks.items() if t.method is not None}
    first = build_json(cwd=tmp_path)["merges"]["m"]
    e4m3 = (tmp_path / "m.safetensors").read_bytes()
    assert first["computed"] == len(keys) > 0

    weighted_sum(tmp_path, "float8_e5m2")
    other = {n: t.key for n, t in api.plan(mf).merges["m"].tasks.items() if t.method is not None}
    assert other.keys() == keys.keys() and not set(other.values()) & set(keys.values())
    dry = run_cli("-n", "-v", cwd=tmp_path, check=True).stdout
    assert "m.dtype: float8_e4m3fn -> float8_e5m2" in dry, dry
    second = build_json(cwd=tmp_path)["merges"]["m"]
    assert second["computed"] == len(keys)
    out = load(tmp_path / "m.safetensors")
    assert all(t.dtype == torch.float8_e5m2 for k, t in out.items() if k in keys)

    weighted_sum(tmp_path, "float8_e4m3fn")
    third = build_json(cwd=tmp_path)["merges"]["m"]
    assert third["computed"] == 0  # every e4m3fn tensor is still in the cache
    assert (tmp_path / "m.safetensors").read_bytes() == e4m3


def test_float8_inputs_are_merged_in_the_compute_dtype(tmp_path):
    g = torch.Generator().manual_seed(5)
    models = {}
    for name in ("a", "b"):
        t = small_model(7, dtype=torch.float32, extra={BIG_KEY: torch.randn(300, 300, generator=g) * 30})
        t = {k: (v + torch.randn(v.shape, generator=g)).to(torch.float8_e4m3fn) if v.is_floating_point() else v
             for k, v in t.items()}
        write_model(tmp_path / f"{name}.safetensors", t)
        models[name] = t
    a, b = models["a"], models["b"]
    text = weighted_sum(tmp_path, "float32").read_text()
    mergefile(tmp_path / "mergefile.toml", text)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    for k in (key, BIG_KEY):  # batched with the small tensors, and alone
        expected = torch.lerp(a[k].float(), b[k].float(), 0.25)
        assert same(out[k], expected)
        assert not torch.equal(expected.to(torch.float8_e4m3fn).float(), expected)  # not computed in float8

    mergefile(tmp_path / "mergefile.toml", text.replace('dtype = "float32"\n', ""))
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")  # written as the inputs' float8, from the float32 result
    for k in (key, BIG_KEY):
        expected = saturated_cast(torch.lerp(a[k].float(), b[k].float(), 0.25).double(), "float8_e4m3fn")
        assert same(out[k], expected)

"""ComfyUI scaled-fp8 sources through the real CLI: the merge sees weight.float() * scale_weight,
never the scale or marker tensors; the dequantisation is imported once; a plain fp8 file is read
as it is and merged in float32, cast back to fp8."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import build_json, load, mergefile, write_model
from tests.faults.conftest import mb

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

F8 = torch.float8_e4m3fn
MERGE = """
[models.a]
path = "a.safetensors"
[models.b]
path = "b.safetensors"
[merges.m]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = {alpha}
output = "m.safetensors"
"""


def _fp8(shape, seed: int) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(F8)


def scaled_file(prefix: str = "") -> dict[str, torch.Tensor]:
    """A flux-like scaled-fp8 checkpoint as ComfyUI's files have it: the marker, fp8 weights with a
    float32 scale_weight (0-d or 1-element) and a scale_input of 1, bf16 biases, an unscaled fp8 and
    an unscaled bf16 weight."""
    p = prefix
    return {
        p + "scaled_fp8": torch.empty(0, dtype=F8),
        p + "double_blocks.0.img_attn.qkv.weight": _fp8((24, 16), 1),
        p + "double_blocks.0.img_attn.qkv.scale_weight": torch.tensor(0.0123, dtype=torch.float32),
        p + "double_blocks.0.img_attn.qkv.scale_input": torch.tensor(1.0, dtype=torch.float32),
        p + "double_blocks.0.img_attn.qkv.bias": torch.randn(24).to(torch.bfloat16),
        p + "final_layer.linear.weight": _fp8((8, 16), 2),
        p + "final_layer.linear.scale_weight": torch.tensor([0.5], dtype=torch.float32),
        p + "txt_in.weight": _fp8((16, 8), 3),
        p + "img_in.weight": torch.randn(16, 8).to(torch.bfloat16),
    }


def plain_model(names) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    hidden = ("scale_weight", "scale_input", "scaled_fp8")
    shapes = {n: t.shape for n, t in scaled_file().items() if not n.endswith(hidden)}
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items() if n in names}


def dequantised(state: dict) -> dict[str, torch.Tensor]:
    """ComfyUI's rule, computed here independently: weight.float() * scale_weight.float()."""
    out = {}
    for name, t in state.items():
        if name.endswith(("scale_weight", "scale_input", "scaled_fp8")):
            continue
        scale = state.get(name.removesuffix(".weight") + ".scale_weight")
        out[name] = t.float() * scale.float() if scale is not None else t
    return out


def test_scaled_fp8_merges_as_its_dequantised_weights(tmp_path, monkeypatch):
    from mergebuild.tensors import scaled_fp8

    imports, real = [], scaled_fp8.dequantized
    monkeypatch.setattr(scaled_fp8, "dequantized", lambda *a: imports.append(a[0]) or real(*a))
    a = scaled_file()
    b = plain_model(a)
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    mergefile(tmp_path / "mergefile.toml", MERGE.format(alpha=0.5))
    build_json(cwd=tmp_path)

    out = load(tmp_path / "m.safetensors")
    want = dequantised(a)
    assert set(out) == set(want) == set(b)  # no scale_weight, scale_input or marker
    for name, t in want.items():
        expect = torch.lerp(t.float(), b[name].float(), 0.5).to(t.dtype)  # A's dtype: float32 once dequantised
        assert out[name].dtype == t.dtype and torch.equal(out[name].view(torch.uint8), expect.view(torch.uint8)), name
    assert out["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float32

    assert build_json(cwd=tmp_path)["merges"]["m"]["computed"] == 0
    assert len(imports) == 1  # dequantised once; the second build reads the imported blobs


def test_a_prefixed_marker_scales_the_weights_under_its_prefix(tmp_path):
    prefix = "model.diffusion_model."
    a = scaled_file(prefix)
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", {prefix + n: t for n, t in plain_model(scaled_file()).items()})
    mergefile(tmp_path / "mergefile.toml", MERGE.format(alpha=0.0))
    build_json(cwd=tmp_path)
    out, want = load(tmp_path / "m.safetensors"), dequantised(a)
    assert set(out) == set(want)
    assert torch.equal(out[prefix + "final_layer.linear.weight"], want[prefix + "final_layer.linear.weight"])


def test_plain_fp8_sources_merge_in_float32_and_cast_back(tmp_path):
    a = {"w": _fp8((32, 16), 4), "v": _fp8((7,), 5)}
    b = {"w": _fp8((32, 16), 6), "v": _fp8((7,), 7)}
    write_model(tmp_path / "a.safetensors", a)
    write_model(tmp_path / "b.safetensors", b)
    mergefile(tmp_path / "mergefile.toml", MERGE.format(alpha=0.3))
    build_json(cwd=tmp_path)
    out = load(tmp_path / "m.safetensors")
    for name in a:
        expect = torch.lerp(a[name].float(), b[name].float(), 0.3).to(F8)  # in range: no saturation
        assert out[name].dtype == F8 and torch.equal(out[name].view(torch.uint8), expect.view(torch.uint8)), name


def _refused(tmp_path, state: dict, *fragments: str) -> None:
    write_model(tmp_path / "a.safetensors", state)
    write_model(tmp_path / "b.safetensors", plain_model(scaled_file()))
    mergefile(tmp_path / "mergefile.toml", MERGE.format(alpha=0.5))
    mb(tmp_path).one_line_error(2, "a.safetensors", *fragments)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("change, fragments", [
    (lambda s: s.pop("scaled_fp8"), ["scales an fp8 weight, but the file has no scaled_fp8 marker"]),
    (lambda s: s.pop("final_layer.linear.weight"),
     ["'final_layer.linear.scale_weight' scales 'final_layer.linear.weight', which the file does not have"]),
    (lambda s: s.update({"final_layer.linear.scale_weight": torch.ones(3)}), ["of shape [3] does not scale"]),
    (lambda s: s.update({"final_layer.linear.scale_weight": torch.ones((), dtype=torch.int32)}),
     ["is I32, not a floating-point scale"]),
], ids=["no marker", "no weight", "bad shape", "integer scale"])
def test_a_malformed_scaled_file_is_one_line_exit_2(tmp_path, change, fragments):
    state = scaled_file()
    change(state)
    _refused(tmp_path, state, *fragments)


def test_a_scale_outside_the_markers_prefix_is_refused(tmp_path):
    state = scaled_file("model.diffusion_model.")
    state["first_stage_model.x.weight"] = _fp8((2, 2), 8)
    state["first_stage_model.x.scale_weight"] = torch.tensor(2.0)
    _refused(tmp_path, state, "'first_stage_model.x.scale_weight' is a scale outside every scaled_fp8 marker's prefix")


def test_a_scaled_shard_in_a_folder_is_refused(tmp_path):
    write_model(tmp_path / "folder" / "model.safetensors", scaled_file())
    write_model(tmp_path / "b.safetensors", plain_model(scaled_file()))
    mergefile(tmp_path / "mergefile.toml", MERGE.format(alpha=0.5).replace('"a.safetensors"', '"folder"'))
    mb(tmp_path).one_line_error(2, "model.safetensors", "a ComfyUI scaled-fp8 shard")

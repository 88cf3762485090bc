"""Methods that take parts of models, and the post-steps usable on any merge."""

from __future__ import annotations

import torch

from tests.conftest import load, mergefile, run_cli, small_model, write_model

TE = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
UNET = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
VAE = "first_stage_model.decoder.conv_in.weight"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def project(tmp_path, merge: str, b=None, extra_a=None):
    write_model(tmp_path / "a.safetensors", small_model(1, extra=extra_a))
    write_model(tmp_path / "b.safetensors", b if b is not None else small_model(2))
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        [merges.m]
        inputs = ["a", "b"]
        output = "m.safetensors"
    """ + merge)
    return tmp_path


def test_swap_text_encoder(tmp_path):
    # SD1 is detected from these two keys
    sd = {"model.diffusion_model.input_blocks.11.0.weight": torch.ones(2).half()}
    project(tmp_path, 'method = "swap"\ncomponent = "text_encoder"\n', b=small_model(2, extra=sd), extra_a=sd)
    run_cli(cwd=tmp_path, check=True)
    a, b, out = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors"), load(tmp_path / "m.safetensors")
    assert torch.equal(out[TE], b[TE]) and torch.equal(out[UNET], a[UNET]) and torch.equal(out[VAE], a[VAE])
    assert torch.equal(out[POS], a[POS])  # never merged


def test_swap_by_pattern(tmp_path):
    project(tmp_path, 'method = "swap"\nmatch = "proj_in"\n')
    run_cli(cwd=tmp_path, check=True)
    a, b, out = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors"), load(tmp_path / "m.safetensors")
    assert torch.equal(out[UNET], b[UNET]) and torch.equal(out[TE], a[TE])


def test_attention_swap_chosen_blocks_and_parts(tmp_path):
    keys = {f"model.diffusion_model.{blk}.1.transformer_blocks.0.{part}.to_k.weight"
            for blk in ("input_blocks.4", "input_blocks.7", "middle_block") for part in ("attn1", "attn2")}
    keys.add("model.diffusion_model.input_blocks.11.0.weight")
    extra = {k: torch.randn(4, 4).half() for k in keys}
    extra_b = {k: torch.randn(4, 4).half() for k in keys}
    project(tmp_path, 'method = "attention_swap"\nblocks = "IN04 M00"\nparts = "attn2"\n',
            b=small_model(2, extra=extra_b), extra_a=extra)
    run_cli(cwd=tmp_path, check=True)
    a, b, out = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors"), load(tmp_path / "m.safetensors")
    for key in keys:
        from_b = "attn2" in key and ("input_blocks.4." in key or "middle_block" in key)
        assert torch.equal(out[key], b[key] if from_b else a[key]), key


def test_bake_vae_from_a_standalone_vae_file(tmp_path):
    vae = {"decoder.conv_in.weight": torch.full((4, 4, 3, 3), 7.0), "loss.logvar": torch.zeros(1)}
    project(tmp_path, 'method = "bake_vae"\n', b=vae)
    run_cli(cwd=tmp_path, check=True)
    a, out = load(tmp_path / "a.safetensors"), load(tmp_path / "m.safetensors")
    assert torch.equal(out[VAE], torch.full((4, 4, 3, 3), 7.0).half())  # cast to A's dtype
    assert set(out) == set(a) and torch.equal(out[UNET], a[UNET])


def test_bake_vae_says_when_nothing_matched(tmp_path):
    project(tmp_path, 'method = "bake_vae"\n', b={"decoder.up_blocks.0.resnets.0.conv1.weight": torch.ones(2)})
    proc = run_cli(cwd=tmp_path, check=True)
    assert "warning: m: bake_vae changed no tensor" in proc.stderr


def test_clip_to_inputs(tmp_path):
    project(tmp_path, 'method = "weighted_sum"\nalpha = 3.0\nclip_to_inputs = true\ndtype = "float32"\n')
    run_cli(cwd=tmp_path, check=True)
    a, b, out = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors"), load(tmp_path / "m.safetensors")
    lo, hi = torch.minimum(a[UNET], b[UNET]).float(), torch.maximum(a[UNET], b[UNET]).float()
    expected = torch.clamp(a[UNET].float() + 3.0 * (b[UNET].float() - a[UNET].float()), lo, hi)
    torch.testing.assert_close(out[UNET], expected)


def test_fix_clip_position_ids(tmp_path):
    broken = {POS: (torch.arange(77).reshape(1, 77).float() + 0.4)}
    project(tmp_path, 'method = "weighted_sum"\nalpha = 0.5\nfix_clip_position_ids = true\n', extra_a=broken)
    run_cli(cwd=tmp_path, check=True)
    out = load(tmp_path / "m.safetensors")
    assert out[POS].dtype == torch.int64 and torch.equal(out[POS], torch.arange(77).reshape(1, 77))


def test_a_swapped_tensor_depends_only_on_the_input_it_takes(tmp_path):
    """swap takes B's tensor: its cache key hashes B's digest alone, so an edit of A's tensor
    leaves it clean (and -n counts only the tensors that really change)."""
    project(tmp_path, 'method = "swap"\nmatch = "proj_in"\n')
    run_cli(cwd=tmp_path, check=True)
    a = load(tmp_path / "a.safetensors")
    a[UNET] += 1  # A's copy of the swapped key
    write_model(tmp_path / "a.safetensors", a)
    import json

    dry = json.loads(run_cli("-n", "--json", cwd=tmp_path, check=True).stdout)["merges"]["m"]
    assert dry["dirty"] == 0  # proj_in comes from B; A's other tensors pass through unchanged
    out = load(tmp_path / "m.safetensors")
    run_cli(cwd=tmp_path, check=True)
    assert torch.equal(load(tmp_path / "m.safetensors")[UNET], out[UNET])

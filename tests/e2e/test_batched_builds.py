"""Small tensors computed in batches (mergebuild/execute/batching.py), driven through the CLI on
fabricated SD1-shaped models: the same bits whatever the batch, and a bounded staging window."""

from __future__ import annotations

import torch

from mergebuild.testing.fabricate import fabricate_family
from tests.conftest import build_json, load, mergefile, run_cli, write_model

SMALL_KEY = "model.diffusion_model.input_blocks.4.1.norm.bias"  # 640 / 64 = 10 elements: batched

TEXT = """
[settings]
{settings}
[models.base]
path = "sd15-base.safetensors"
[models.real]
path = "sd15-real.safetensors"
[models.anime]
path = "{anime}"
[merges.mix]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = 0.35
[merges.final]
method = "add_difference"
inputs = ["mix", "real", "base"]
alpha = 0.6
output = "final.safetensors"
"""


def family(tmp_path):
    fabricate_family(tmp_path, "sd1-ldm", shrink=64)
    anime = load(tmp_path / "sd15-anime.safetensors")
    anime[SMALL_KEY] = anime[SMALL_KEY] + 1
    write_model(tmp_path / "anime-v1.safetensors", anime)


def build(tmp_path, cache, anime="sd15-anime.safetensors", settings=""):
    mergefile(tmp_path / "mergefile.toml", TEXT.format(anime=anime, settings=settings))
    return build_json("--cache-dir", tmp_path / cache, cwd=tmp_path)


def test_a_tensor_recomputed_alone_equals_it_computed_in_a_batch(tmp_path):
    family(tmp_path)
    cold = build(tmp_path, "cold")["merges"]
    assert cold["mix"]["computed"] > 1000  # every tensor, most of them small, in batches
    expected = load(tmp_path / "final.safetensors")

    build(tmp_path, "history", anime="anime-v1.safetensors")
    rebuilt = build(tmp_path, "history")["merges"]
    assert rebuilt["mix"]["computed"] == 1 and rebuilt["final"]["computed"] == 1  # alone, not batched
    out = load(tmp_path / "final.safetensors")
    assert out.keys() == expected.keys()
    assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_batched_results_match_the_formula(tmp_path):
    family(tmp_path)
    build(tmp_path, "cache")
    base, real, anime = (load(tmp_path / f"sd15-{n}.safetensors") for n in ("base", "real", "anime"))
    out = load(tmp_path / "final.safetensors")
    small = [k for k, v in out.items() if v.is_floating_point() and 0 < v.numel() <= 1 << 16]
    assert len(small) > 500
    for key in small:
        b, r, a = (m[key].double() for m in (base, real, anime))
        want = (r + 0.35 * (a - r)) + 0.6 * (r - b)
        torch.testing.assert_close(out[key].double(), want, rtol=2e-3, atol=2e-3)


def test_a_tiny_staging_window_builds_the_same_bytes(tmp_path):
    family(tmp_path)
    build(tmp_path, "default")
    expected = load(tmp_path / "final.safetensors")
    (tmp_path / "final.safetensors").unlink()
    build(tmp_path, "tiny", settings='staging = "1KB"')
    out = load(tmp_path / "final.safetensors")
    assert all(torch.equal(out[k], expected[k]) for k in expected)


def test_a_bad_staging_size_is_a_mergefile_error(tmp_path):
    family(tmp_path)
    mergefile(tmp_path / "mergefile.toml", TEXT.format(anime="sd15-anime.safetensors", settings='staging = "lots"'))
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "[settings]" in proc.stderr and "staging" in proc.stderr and "lots" in proc.stderr
    assert not (tmp_path / "final.safetensors").exists()

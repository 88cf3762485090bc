"""The CUDA executor gives the CPU's results (float32 math; seeded masks identical).
Skipped where CUDA is not available; run on a GPU machine with `pytest tests/gpu`."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load, mergefile, run_cli, small_model, write_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

MERGES = {
    "weighted_sum": 'method = "weighted_sum"\ninputs = ["a", "b"]\nalpha = 0.3',
    "ties": 'method = "ties"\ninputs = ["a", "b", "c"]\ndensity = 0.3',
    "dare": 'method = "dare"\ninputs = ["a", "b", "c"]\ndensity = 0.4\nseed = 7',
    "slerp": 'method = "slerp"\ninputs = ["a", "b"]\nalpha = 0.4',
}


BIG_KEY = "model.diffusion_model.middle_block.1.proj_out.weight"


@pytest.mark.parametrize("staging", ["256MB", "1KB"])
@pytest.mark.parametrize("name", list(MERGES))
def test_cuda_matches_cpu(tmp_path, name, staging):
    """Small tensors go as batches (one staging buffer per input), the big one alone; a 1 KB
    staging window makes every upload wait for the compute before it."""
    for seed, model in ((1, "a"), (2, "b"), (3, "c")):
        big = {BIG_KEY: torch.randn(300, 300, generator=torch.Generator().manual_seed(seed))}  # not batched
        write_model(tmp_path / f"{model}.safetensors", small_model(seed, dtype=torch.float32, extra=big))
    mergefile(tmp_path / "mergefile.toml", f"""
        [settings]
        staging = "{staging}"
        [models.a]
        path = "a.safetensors"
        [models.b]
        path = "b.safetensors"
        [models.c]
        path = "c.safetensors"
        [merges.m]
        {MERGES[name]}
        output = "m.safetensors"
    """)
    run_cli("--device", "cpu", "--cache-dir", tmp_path / "cpu-cache", cwd=tmp_path, check=True)
    cpu = load(tmp_path / "m.safetensors")
    (tmp_path / "m.safetensors").unlink()
    run_cli("--device", "cuda", "--cache-dir", tmp_path / "gpu-cache", cwd=tmp_path, check=True)
    gpu = load(tmp_path / "m.safetensors")
    for key in cpu:
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-5, atol=1e-6)
        if name == "dare":
            assert torch.equal(gpu[key] == load(tmp_path / "a.safetensors")[key], cpu[key] == load(tmp_path / "a.safetensors")[key])

"""Results of a chunked merge are written into memory that earlier results held (execute/
tensorio.py ResultBuffers): through the CLI, an output and a cached intermediate come out with
the right bytes and the right ModelSpec hash while buffers are being reused."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mergebuild.execute import tensorio
from tests.conftest import load, mergefile, run_cli, write_model

pytestmark = pytest.mark.portable  # also run with the Unix-only calls taken away (docs/portability.md)

CHAIN = """
[models.a]
path = "a.safetensors"
[models.b]
path = "b.safetensors"
[merges.mid]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.3
[merges.final]
method = "weighted_sum"
inputs = ["mid", "a"]
alpha = 0.5
output = "out/final.safetensors"
"""


def _models(folder, tensors: int) -> None:
    for seed, name in ((1, "a"), (2, "b")):
        g = torch.Generator().manual_seed(seed)  # 5 MB each: above the streaming mmap threshold
        write_model(folder / f"{name}.safetensors",
                    {f"model.diffusion_model.layer{i}.weight": torch.randn(1280, 1024, generator=g) for i in range(tensors)})


def _assert_data_hash(path) -> None:
    """ModelSpec's hash_sha256 in the header is the sha256 of the file's tensor data."""
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8 : 8 + header])["__metadata__"]
    assert metadata["modelspec.hash_sha256"] == "0x" + hashlib.sha256(raw[8 + header :]).hexdigest(), path


def test_reused_result_memory_gives_the_right_bytes_and_hash(tmp_path, monkeypatch):
    _models(tmp_path, 12)
    mergefile(tmp_path / "mergefile.toml", CHAIN)
    lent = []
    empty = tensorio.ResultBuffers.empty

    def spy(self, shape, dtype):
        out = empty(self, shape, dtype)
        lent.append(out.data_ptr())
        return out

    monkeypatch.setattr(tensorio.ResultBuffers, "empty", spy)
    run_cli(cwd=tmp_path, check=True)
    assert len(set(lent)) < len(lent) == 24, "no result was written into reused memory"
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    out = load(tmp_path / "out/final.safetensors")
    for key in a:
        assert torch.equal(out[key], torch.lerp(torch.lerp(a[key], b[key], 0.3), a[key], 0.5)), key
    _assert_data_hash(tmp_path / "out/final.safetensors")


def test_bytes_the_writer_keeps_are_not_written_over(tmp_path, monkeypatch):
    """The first tensor's write is slowed, so the next ones are written ahead of the hash and
    kept by the writer: their memory must not hold later results before it is hashed."""
    import time

    from mergebuild.tensors import writer

    _models(tmp_path, 8)
    mergefile(tmp_path / "mergefile.toml", CHAIN.replace('alpha = 0.3\n[merges.final]', 'alpha = 0.3\noutput = "out/mid.safetensors"\n[merges.final]'))
    write = writer.SafetensorsWriter.write

    def slow_first(self, name, data, at=0):
        if name.endswith("layer0.weight"):
            time.sleep(1.0)
        return write(self, name, data, at)

    monkeypatch.setattr(writer.SafetensorsWriter, "write", slow_first)
    run_cli(cwd=tmp_path, check=True)
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    for name in ("mid", "final"):
        _assert_data_hash(tmp_path / f"out/{name}.safetensors")
    out = load(tmp_path / "out/mid.safetensors")
    for key in a:
        assert torch.equal(out[key], torch.lerp(a[key], b[key], 0.3)), key

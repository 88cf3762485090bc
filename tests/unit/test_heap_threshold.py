"""glibc's mmap threshold during a build (portable.set_mmap_threshold): while an elementwise
merge streams, above one chunk of the compute dtype, so each chunk's result is heap memory used
again (not a fresh mapping the kernel zeroes and faults in page by page); while a whole-tensor
method runs, glibc's own ceiling."""

from __future__ import annotations

import pytest

import mergebuild.execute.executor as executor
from mergebuild.portable import WHOLE_TENSOR_MMAP
from tests.conftest import build_json, mergefile, small_model, write_model

TEXT = """
[settings]
compute_dtype = "{dtype}"
[models.A]
path = "a.safetensors"
[models.B]
path = "b.safetensors"
[merges.ws]
method = "weighted_sum"
inputs = ["A", "B"]
alpha = 0.5
[merges.ties]
method = "ties"
inputs = ["ws", "A", "B"]
density = 0.5
output = "out.safetensors"
"""


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("float64", 8)])
def test_a_chunks_result_stays_below_the_threshold(tmp_path, monkeypatch, dtype, size):
    write_model(tmp_path / "a.safetensors", small_model(1))
    write_model(tmp_path / "b.safetensors", small_model(2))
    mergefile(tmp_path / "mergefile.toml", TEXT.format(dtype=dtype))
    calls = []
    monkeypatch.setattr(executor, "set_mmap_threshold", calls.append)
    build_json(cwd=tmp_path)
    streaming, whole = calls[0], calls[-1]
    assert streaming > executor.CHUNK * size  # the weighted sum's chunks come from the heap
    assert streaming < executor.CHUNK * size + (1 << 20)  # and hardly any bigger block does
    assert whole == WHOLE_TENSOR_MMAP  # TIES

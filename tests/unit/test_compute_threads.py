"""torch's threads during a CPU build (execute/device.py compute_threads): an elementwise merge
leaves two cores to the readers, writers and hashers, a whole-tensor method gets torch's
default, a user's OMP_NUM_THREADS is left alone, and the process gets its count back after.
And glibc's mmap threshold (portable.set_mmap_threshold): while an elementwise merge streams,
just above one chunk in the compute dtype, so each chunk's result is heap memory used again,
not a fresh mapping faulted in page by page; while a whole-tensor method runs, glibc's ceiling."""

from __future__ import annotations

import pytest
import torch

import mergebuild.execute.device as device
import mergebuild.execute.executor as executor
from mergebuild.portable import WHOLE_TENSOR_MMAP
from tests.conftest import build_json, mergefile, small_model, write_model

TEXT = """
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


def test_the_rule():
    assert device.compute_threads(2, True, 2) == 1
    assert device.compute_threads(1, True, 1) == 1
    assert device.compute_threads(16, True, 16) == 14
    assert device.compute_threads(2, False, 2) == 2  # whole-tensor methods: torch's default


def _build(tmp_path, monkeypatch, cores: int) -> list[int]:
    write_model(tmp_path / "a.safetensors", small_model(1))
    write_model(tmp_path / "b.safetensors", small_model(2))
    mergefile(tmp_path / "mergefile.toml", TEXT)
    monkeypatch.setattr(device, "usable_cores", lambda: cores)
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    build_json(cwd=tmp_path)
    return calls


def test_elementwise_then_whole_tensor_then_restored(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    calls = _build(tmp_path, monkeypatch, cores=before + 3)
    assert calls[0] == before + 1  # the weighted sum: the cores less two
    assert before in calls[1:]  # TIES: torch's default again
    assert torch.get_num_threads() == before


def test_a_users_thread_count_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _build(tmp_path, monkeypatch, cores=8) == []


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("float64", 8)])
def test_a_chunks_result_stays_below_the_mmap_threshold(tmp_path, monkeypatch, dtype, size):
    write_model(tmp_path / "a.safetensors", small_model(1))
    write_model(tmp_path / "b.safetensors", small_model(2))
    mergefile(tmp_path / "mergefile.toml", f'[settings]\ncompute_dtype = "{dtype}"\n' + TEXT)
    calls = []
    monkeypatch.setattr(executor, "set_mmap_threshold", calls.append)
    build_json(cwd=tmp_path)
    streaming, whole = calls[0], calls[-1]
    assert executor.CHUNK * size < streaming < executor.CHUNK * size + (1 << 20)  # the weighted sum
    assert whole == WHOLE_TENSOR_MMAP  # TIES

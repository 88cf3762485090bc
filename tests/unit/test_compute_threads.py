"""torch's threads during a CPU build (execute/device.py compute_threads): an elementwise merge
leaves two cores to the readers, writers and hashers, a whole-tensor method gets torch's
default, a user's OMP_NUM_THREADS is left alone, and the process gets its count back after."""

from __future__ import annotations

import torch

import mergebuild.execute.device as device
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

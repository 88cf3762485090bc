"""Devices: auto picks CUDA, then MPS, then the CPU; MPS refuses float64; a device this torch
lacks is a usage error; the generic accelerator transfer gives the CPU's numbers."""

from __future__ import annotations

import pytest
import torch

from mergebuild.errors import UsageError
from mergebuild.execute import device as dev
from mergebuild.planning.sources import TensorRef
from mergebuild.tensors.convert import to_bytes


def _fake_mps(monkeypatch, available: bool):
    monkeypatch.setattr(dev, "_mps_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_prefers_mps_to_the_cpu_but_not_for_float64(monkeypatch):
    _fake_mps(monkeypatch, True)
    assert dev.resolve_device("auto", "F32").type == "mps"
    assert dev.resolve_device("auto", "F64").type == "cpu"
    with pytest.raises(UsageError, match="MPS has no float64"):
        dev.resolve_device("mps", "F64")


def test_a_device_that_is_not_here_is_a_usage_error(monkeypatch):
    _fake_mps(monkeypatch, False)
    assert dev.resolve_device("auto").type == "cpu"
    with pytest.raises(UsageError, match="MPS .* is not available here"):
        dev.resolve_device("mps")
    with pytest.raises(UsageError, match="CUDA is not available"):
        dev.resolve_device("cuda:1")


def test_the_accelerator_transfer_round_trips_like_the_cpu():
    t = dev.DeviceTransfer(torch.device("cpu"), "F32")  # its code path, on the device we have
    x = torch.randn(5, 3).half()
    ref = TensorRef("F16", (5, 3), None)
    (up,) = t.ready(t.upload([bytearray(to_bytes(x))], [ref]))
    assert up.dtype == torch.float32 and torch.equal(up, x.float())
    batch = t.ready(t.upload_batch([[bytearray(to_bytes(x))], [bytearray(to_bytes(x))]], [[ref], [ref]]))
    assert batch[0].shape == (30,)
    assert torch.equal(t.fetch(t.download(up * 2, "F16")), (x.float() * 2).half())

"""Malformed pickled checkpoints: one InputError line naming the file (and the key), never a
traceback; what load_legacy returns is always dense, strided CPU tensors mergebuild can store."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch

from mergebuild.dtypes import FROM_TORCH_NAME
from mergebuild.errors import InputError
from mergebuild.tensors.convert import code_of, to_bytes
from mergebuild.tensors.legacy import load_legacy
from tests.conftest import mergefile, write_model
from tests.faults.conftest import mb


def _saved(tmp_path, obj, name="m.ckpt"):
    path = tmp_path / name
    with warnings.catch_warnings():  # building the odd tensors warns (beta layouts, deprecations)
        warnings.simplefilter("ignore")
        torch.save(obj, path)
    return path


def _truncated(tmp_path):
    path = _saved(tmp_path, {"w": torch.ones(64)})
    path.write_bytes(path.read_bytes()[:-40])
    return path


def _short_storage(tmp_path):
    """A well-formed zip whose tensor data record is shorter than the pickle says."""
    import zipfile

    full = _saved(tmp_path, {"w": torch.ones(64)}, name="full.ckpt")
    path = tmp_path / "m.ckpt"
    with zipfile.ZipFile(full) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, data[:100] if info.filename.endswith("data/0") else data)
    return path


def _sparse_csr():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.eye(3).to_sparse_csr()


def _nested(layout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)


def _quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


# (id, how to make the file, fragments of the message after "PATH: ")
CASES = [
    ("empty file", lambda p: _bytes(p, b""), ["cannot load as a weights-only checkpoint: EOFError"]),
    ("not a pickle", lambda p: _bytes(p, b"hello, world"), ["cannot load as a weights-only checkpoint"]),
    ("truncated zip", _truncated, ["cannot load as a weights-only checkpoint"]),
    ("tensor data cut short", _short_storage, ["cannot load as a weights-only checkpoint: record size (100 bytes)"]),
    ("code in the pickle", lambda p: _bytes(p, pickle.dumps(print)), ["cannot load as a weights-only checkpoint"]),
    ("a list", lambda p: _saved(p, [torch.ones(2)]), ["holds no state dict (it holds a list)"]),
    ("a bare tensor", lambda p: _saved(p, torch.ones(2)), ["holds no state dict (it holds a Tensor)"]),
    ("no tensors", lambda p: _saved(p, {"global_step": 5}), ["holds no tensors"]),
    ("int key", lambda p: _saved(p, {"a": torch.ones(1), 3: torch.ones(2)}), ["non-string key 3 (int)"]),
    ("tuple key", lambda p: _saved(p, {("a", 1): torch.ones(2)}), ["non-string key ('a', 1) (tuple)"]),
    ("sparse coo", lambda p: _saved(p, {"s": torch.ones(2).to_sparse()}), ["tensor 's' is a sparse tensor (torch.sparse_coo)"]),
    ("sparse csr", lambda p: _saved(p, {"s": _sparse_csr()}), ["tensor 's' is a sparse tensor (torch.sparse_csr)"]),
    ("nested strided", lambda p: _saved(p, {"n": _nested(torch.strided)}), ["tensor 'n' is a nested tensor"]),
    ("nested jagged", lambda p: _saved(p, {"n": _nested(torch.jagged)}), ["tensor 'n' is a nested tensor"]),
    ("quantized", lambda p: _saved(p, {"q": _quantized()}), ["tensor 'q' is a quantized tensor (torch.qint8)"]),
    ("meta", lambda p: _saved(p, {"m": torch.empty(2, device="meta")}), ["tensor 'm' is on device 'meta'"]),
    ("complex64", lambda p: _saved(p, {"c": torch.ones(2, dtype=torch.complex64)}),
     ["tensor 'c' has dtype torch.complex64, which mergebuild does not support"]),
    ("float8 fnuz", lambda p: _saved(p, {"f": torch.zeros(2, dtype=torch.float8_e4m3fnuz)}),
     ["tensor 'f' has dtype torch.float8_e4m3fnuz"]),
    ("bad tensor under state_dict",
     lambda p: _saved(p, {"state_dict": {"ok": torch.ones(1), "s": torch.ones(2).to_sparse()}}),
     ["tensor 's' is a sparse tensor"]),
]


def _bytes(tmp_path, content: bytes):
    path = tmp_path / "m.ckpt"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("make, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_one_input_error_naming_the_file(tmp_path, make, fragments):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_legacy(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_what_loads_is_dense_cpu_and_storable(tmp_path):
    dtypes = [getattr(torch, name) for name in FROM_TORCH_NAME]
    state = {f"t.{d}": torch.zeros(3, 2, dtype=d) for d in dtypes}
    state["transposed"] = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous: made contiguous on import
    state["param"] = torch.nn.Parameter(torch.ones(2))
    state["sliced"] = torch.arange(10, dtype=torch.int32)[2:8:2]
    path = _saved(tmp_path, {"state_dict": state, "global_step": 7, 5: "non-tensor entries are skipped"})
    loaded = load_legacy(path)
    assert set(loaded) == set(state)
    for key, t in loaded.items():
        assert t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized and not t.is_nested
        code_of(t)  # a dtype safetensors has a code for
        assert bytes(to_bytes(t)) == bytes(to_bytes(state[key].detach().contiguous())), key


def test_cli_bad_checkpoint_exit_2_one_line(tmp_path):
    write_model(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    _saved(tmp_path, {"w": torch.ones(2).to_sparse()}, name="old.ckpt")
    mergefile(tmp_path / "mergefile.toml", """
        [models.a]
        path = "a.safetensors"
        [models.old]
        path = "old.ckpt"
        [merges.m]
        method = "weighted_sum"
        inputs = ["a", "old"]
        alpha = 0.5
        output = "m.safetensors"
    """)
    mb(tmp_path).one_line_error(2, "old.ckpt", "tensor 'w' is a sparse tensor")
    assert not (tmp_path / "m.safetensors").exists()

"""Legacy pickled checkpoints (.ckpt, .pt, .bin), loaded without running untrusted code."""

from __future__ import annotations

import warnings
from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.torchlazy import dtype_code, torch

LEGACY_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_legacy(path: Path) -> dict:
    """The state dict of a pickled checkpoint, loaded with weights_only=True (no code runs).

    A checkpoint that nests its weights under "state_dict" (as SD .ckpt files do) is unwrapped.
    Non-tensor entries (a global_step, say) are skipped. Every tensor returned is a dense, strided
    CPU tensor of a dtype safetensors can store, under a string key: anything else is an InputError
    naming the file and the key. The whole file is read into memory; convert such files to
    safetensors for bounded memory.
    """
    obj = _load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: the checkpoint holds no state dict (it holds a {type(obj).__name__})")
    tensors = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[_key(path, key)] = _check_tensor(path, key, value)
    if not tensors:
        raise InputError(f"{path}: the checkpoint holds no tensors")
    return tensors


def _load(path: Path):
    try:
        # torch warns about beta layouts and deprecated storages while unpickling: a bad file
        # must still cost one line of output, the error
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for bad pickles, some with no message
        raise InputError(f"{path}: cannot load as a weights-only checkpoint: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _key(path: Path, key) -> str:
    if not isinstance(key, str):  # safetensors names are strings; 0 and "0" would also collide
        raise InputError(f"{path}: the state dict has a non-string key {key!r} ({type(key).__name__})")
    return key


def _check_tensor(path: Path, key: str, t):
    """The tensor if mergebuild can hash and store its bytes as they are; else why not."""
    where = f"{path}: tensor {key!r}"
    if t.is_nested:
        raise InputError(f"{where} is a nested tensor, which safetensors cannot store")
    if t.layout != torch.strided:
        raise InputError(f"{where} is a sparse tensor ({t.layout}), which safetensors cannot store")
    if t.is_quantized:
        raise InputError(f"{where} is a quantized tensor ({t.dtype}), which safetensors cannot store")
    if t.device.type != "cpu":  # map_location cannot move meta tensors: they hold no data
        raise InputError(f"{where} is on device {t.device.type!r}, with no data in the file")
    try:
        dtype_code(t.dtype)
    except KeyError:
        raise InputError(f"{where} has dtype {t.dtype}, which mergebuild does not support") from None
    return t

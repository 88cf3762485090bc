"""Legacy pickled checkpoints (.ckpt, .pt, .bin), loaded without running untrusted code."""

from __future__ import annotations

from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.torchlazy import torch

LEGACY_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_legacy(path: Path) -> dict:
    """The state dict of a pickled checkpoint, loaded with weights_only=True (no code runs).

    A checkpoint that nests its weights under "state_dict" (as SD .ckpt files do) is unwrapped.
    The whole file is read into memory; convert such files to safetensors for bounded memory.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for bad pickles
        raise InputError(f"{path}: cannot load as a weights-only checkpoint: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: the checkpoint holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"{path}: the checkpoint holds no tensors")
    return tensors

"""The inputs a data-driven merge runs its models on (zipit's `data`).

Two forms, both relative to the Mergefile's folder:
  "inputs.safetensors": a safetensors file holding the inputs as one 2-D floating-point tensor
      [samples, features] (named `inputs`, or the file's only tensor);
  "batches.py:batches": a function of a script, called with no arguments, returning a finite
      iterable of batches: each a 2-D tensor or array [samples, features], or a tuple / list whose
      first item is one (the labels that may follow are ignored).

While planning, `data_digest` checks the form (a file's header: its tensor and width) and
returns the digest the statistic's key holds: the file's bytes (hashed once per file state, then
remembered in the cache index by the file's stamp), or the script's bytes and those of every
project module it imports (mergefile/scripts.py, as for fisher_of's scripts). While computing,
`input_batches` digests the same files again and refuses them if they changed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import xxhash

from mergebuild.errors import BuildError
from mergebuild.mergefile.scripts import bound_names, load_script, parse_script, script_digests, user_modules
from mergebuild.portable import file_stamp

ROW = "zipit-data"  # the fingerprint rows' prefix (never a file path)
FLOATS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20
BATCH_ROWS = 4096  # rows of a data file run through the models at once
SCRIPT_PREFIX = "_mergebuild_data_"


def parse_data(value: str, base: Path) -> tuple[str, Path, str | None]:
    """("file" | "script", absolute path, function name or None) of a `data` value."""
    head, sep, name = value.rpartition(":")
    if sep and head.endswith(".py") and name.isidentifier():
        return "script", (base / head).absolute(), name
    return "file", (base / value).absolute(), None


def data_digest(value: str, base: Path, width: int, index=None) -> str:
    """The digest of the data a `data` value names, after checking its form (ValueError: one line)."""
    kind, path, name = parse_data(value, base)
    if not path.is_file():
        raise ValueError(f"data: {'script' if kind == 'script' else 'file'} not found: {path}")
    if kind == "script":
        try:
            tree = parse_script(path)
        except (SyntaxError, ValueError, OSError) as e:
            raise ValueError(f"data: {path.name} is not a Python script: {e}") from None
        if name not in bound_names(tree):
            raise ValueError(f"data: {path.name} defines no function {name!r}")
        return _scripts_digest(script_digests(path, tree, base.absolute()), base)
    _, shape = _data_tensor(path, width)
    key, stamp = f"{ROW}:{path.resolve()}", file_stamp(path)
    known = index.fingerprint(key, stamp) if index is not None else None
    if known is not None:
        return known[1]
    digest = _file_digest(path)
    if index is not None:
        index.save_fingerprint(key, stamp, {}, digest, None)
    return digest


def _file_digest(path: Path) -> str:
    """xxh3-128 of the file's bytes, read in chunks (a data file may be larger than memory allows twice)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _scripts_digest(files: dict[Path, str], base: Path) -> str:
    """One digest of the script and its project modules, named relative to the Mergefile's
    folder so a moved project keeps it (a script alone: its bytes' digest)."""
    if len(files) == 1:
        return next(iter(files.values()))
    root = base.resolve()
    lines = "".join(f"{Path(os.path.relpath(p, root)).as_posix()}\0{d}\n" for p, d in sorted(files.items()))
    return xxhash.xxh3_128_hexdigest(lines.encode())


def _data_tensor(path: Path, width: int) -> tuple[str, list]:
    """(name, shape) of the inputs tensor of a data file, from its header."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 2 <= size <= MAX_HEADER:
                raise ValueError
            header = json.loads(f.read(size))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if not isinstance(header, dict) or not all(isinstance(v, dict) and "shape" in v for v in tensors.values()):
            raise ValueError
    except (ValueError, UnicodeDecodeError, OSError):
        raise ValueError(f"data: {path.name} is not a safetensors file") from None
    name = "inputs" if "inputs" in tensors else (next(iter(tensors)) if len(tensors) == 1 else None)
    if name is None:
        raise ValueError(f"data: {path.name} holds {len(tensors)} tensors and none is named 'inputs': "
                         "put the inputs in one tensor [samples, features] named inputs")
    dtype, shape = tensors[name].get("dtype"), tensors[name]["shape"]
    if dtype not in FLOATS or len(shape) != 2 or shape[0] < 2:
        raise ValueError(f"data: {path.name}'s {name!r} is {dtype} {shape}: expected floating-point inputs "
                         "[samples (2 or more), features]")
    if shape[1] != width:
        raise ValueError(f"data: {path.name}'s {name!r} has {shape[1]} features per sample; the model's first "
                         f"layer takes {width}")
    return name, shape


def input_batches(value: str, base: str, digest: str, width: int, where: str):
    """The batches of inputs (float tensors [rows, width]) the data holds, checked as they come."""
    from mergebuild.torchlazy import torch

    kind, path, name = parse_data(value, Path(base))
    if kind == "file":
        data = _read_same(path, digest, where)
        from safetensors.torch import load

        tensor_name, _ = _data_tensor(path, width)
        inputs = load(data)[tensor_name]
        if not bool(torch.isfinite(inputs).all()):
            raise ValueError(f"data: {path.name}'s {tensor_name!r} holds NaN or Inf")
        yield from inputs.split(BATCH_ROWS)
        return
    files = _same_scripts(path, Path(base), digest, where)
    for i, batch in enumerate(_script_batches(path, name, Path(base), files, where)):
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        batch = torch.as_tensor(batch)
        if batch.dim() != 2 or batch.shape[1] != width or not batch.is_floating_point():
            raise ValueError(f"data: batch {i} of {value} is {batch.dtype} {list(batch.shape)}: expected "
                             f"floating-point inputs [samples, {width}]")
        if not bool(torch.isfinite(batch).all()):
            raise ValueError(f"data: batch {i} of {value} holds NaN or Inf")
        yield batch


def _read_same(path: Path, digest: str, where: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BuildError(f"[{where}] data: cannot read {path}: {e}") from None
    if xxhash.xxh3_128_hexdigest(data) != digest:
        raise BuildError(f"[{where}] data: {path.name} changed during the build; build again")
    return data


def _same_scripts(path: Path, base: Path, digest: str, where: str) -> list[Path]:
    """The script and its project modules, refused if any changed since planning."""
    try:
        files = script_digests(path, parse_script(path), base.absolute())
    except (OSError, ValueError, SyntaxError) as e:
        raise BuildError(f"[{where}] data: cannot read {path}: {e}") from None
    if _scripts_digest(files, base) != digest:
        raise BuildError(f"[{where}] data: {path.name} or a module it imports changed during the build; build again")
    return list(files)


def _script_batches(path: Path, name: str, base: Path, files: list[Path], where: str):
    with user_modules([path.parent, base.absolute()], files, SCRIPT_PREFIX):
        try:
            fn = getattr(load_script(path, SCRIPT_PREFIX), name, None)
            if not callable(fn):
                raise BuildError(f"[{where}] data: {path.name} defines no function {name!r}")
            yield from fn()
        except (BuildError, KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as e:  # noqa: BLE001 (the user's script: one line, exit 1)
            raise BuildError(f"[{where}] data: {path.name}:{name} raised {type(e).__name__}: {e}") from None

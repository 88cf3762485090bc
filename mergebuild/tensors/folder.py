"""Write a Hugging Face model folder: safetensors shards, their index, and the first input's
config files. Shards are written into a temp folder beside the target, then swapped into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mergebuild.dtypes import nbytes
from mergebuild.tensors.writer import TEMP_MARK, SafetensorsWriter

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# copied from the first input's folder when present: a merged LLM is usable as it is
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def is_folder_output(path: Path) -> bool:
    return Path(path).suffix.lower() != ".safetensors"


def output_marker(path: Path) -> Path:
    """The file whose stat stands for an output: the file itself, or a folder's index or shard."""
    path = Path(path)
    if not is_folder_output(path):
        return path
    index = path / INDEX_NAME
    return index if index.exists() else path / SINGLE_NAME


class FolderWriter:
    def __init__(self, folder: Path, tensors: list[tuple[str, str, tuple[int, ...]]], draft_metadata: dict,
                 shard_size: int, copy_from: Path | None):
        self.folder = Path(folder)
        self.copy_from = copy_from
        self.temp = self.folder.parent / f".{self.folder.name}{TEMP_MARK}{os.getpid()}"
        shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir(parents=True)
        shards = _split(tensors, shard_size)
        self.names = [SINGLE_NAME] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self.writers = [SafetensorsWriter(self.temp / n, shard, draft_metadata) for n, shard in zip(self.names, shards)]
        self.where = {t[0]: w for w, shard in zip(self.writers, shards) for t in shard}
        self.total = sum(nbytes(dt, shape) for _, dt, shape in tensors)

    def write(self, name: str, data, at: int = 0) -> None:
        self.where[name].write(name, data, at)

    def target_of(self, name: str) -> tuple[int, int]:
        return self.where[name].target(name)

    def stored(self, name: str, digest: str) -> bool:
        return False  # folder outputs keep their tensors as blobs

    def mark_done(self, name: str) -> None:
        self.where[name].mark_done(name)

    def data_sha256(self):
        h = None
        for w in self.writers:
            h = w.data_sha256(h)
        return h

    def commit(self, metadata: dict[str, str]) -> None:
        for w in self.writers:
            w.commit(metadata)
        if len(self.writers) > 1:
            weight_map = {t: self.names[self.writers.index(w)] for t, w in self.where.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.temp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if self.copy_from is not None:
            for name in CONFIG_FILES:
                if (self.copy_from / name).exists():
                    shutil.copy2(self.copy_from / name, self.temp / name)
        self._swap_in()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
        shutil.rmtree(self.temp, ignore_errors=True)

    def _swap_in(self) -> None:
        old = self.folder.parent / f".{self.folder.name}.mergebuild-old-{os.getpid()}"
        if self.folder.exists():
            os.rename(self.folder, old)
        os.rename(self.temp, self.folder)
        shutil.rmtree(old, ignore_errors=True)


def _split(tensors: list, shard_size: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        n = nbytes(t[1], t[2])
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards

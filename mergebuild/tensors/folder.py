"""Write a Hugging Face model folder: safetensors shards, their index, and the first input's
config files (config.json as the merge changed it, where its method did: passthrough's layer
count), into a temp folder beside the target, then swapped into place.

Every folder mergebuild writes carries a manifest (.mergebuild-manifest.json) listing each file
it wrote with its size and hash. An existing folder is replaced, and `clean` removes files,
only where the manifest accounts for them: a folder that holds anything else is the user's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import xxhash

from mergebuild.dtypes import nbytes
from mergebuild.errors import BuildError
from mergebuild.portable import FileLock, fsync_dir, replace
from mergebuild.mergefile.model import FILE_SUFFIX
from mergebuild.tensors.header import read_metadata
from mergebuild.tensors.writer import FOLDER_LOCK, TEMP_MARK, SafetensorsWriter, unfinished

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST = ".mergebuild-manifest.json"
# copied from the first input's folder when present: a merged LLM is usable as it is
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def is_folder_output(path: Path) -> bool:
    return Path(path).suffix.lower() != FILE_SUFFIX


def output_marker(path: Path) -> Path:
    """The file whose stamp stands for an output: the file itself, or a folder's manifest."""
    path = Path(path)
    return path / MANIFEST if is_folder_output(path) else path


def written_by_mergebuild(path: Path) -> bool:
    """Whether a safetensors file carries mergebuild's metadata (it wrote the file)."""
    try:
        return "mergebuild.version" in read_metadata(path)  # a no-op build asks it of every output
    except Exception:  # not a readable safetensors file: not ours
        return False


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def foreign_files(folder: Path) -> list[str]:
    """The files of an existing folder that mergebuild did not write (relative names); [] when
    the folder may be replaced. Its manifest says what mergebuild wrote; a folder from before
    manifests is accepted when it holds only mergebuild's shards, their index and configs."""
    folder = Path(folder)
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    dirs = sorted(str(p.relative_to(folder)) + "/" for p in folder.rglob("*") if p.is_dir())
    manifest = read_manifest(folder)
    if manifest is None:
        return dirs + [n for n in names if not _legacy_ours(folder, n)]
    return dirs + [n for n in names if n != MANIFEST and not _matches(folder / n, manifest.get(n))]


def read_manifest(folder: Path) -> dict | None:
    try:
        doc = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        files = doc["files"]
        if isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _matches(path: Path, entry: dict | None) -> bool:
    if entry is None or path.is_symlink():
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_size != entry.get("size"):
        return False
    return st.st_mtime_ns == entry.get("mtime_ns") or file_hash(path) == entry.get("xxh3")


def _legacy_ours(folder: Path, name: str) -> bool:
    if "/" in name or os.sep in name:
        return False
    if name.endswith(FILE_SUFFIX):
        return written_by_mergebuild(folder / name)
    return name == INDEX_NAME or name in CONFIG_FILES


class FolderWriter:
    def __init__(self, folder: Path, tensors: list[tuple[str, str, tuple[int, ...]]], draft_metadata: dict,
                 shard_size: int, copy_from: Path | None, token: str, config: dict | None = None,
                 files: dict[str, bytes | None] | None = None, single_name: str = SINGLE_NAME):
        self.folder = Path(folder)
        self.copy_from = copy_from
        self.config = config  # written as config.json in place of copy_from's
        self.files = files or {}  # written in place of copy_from's (None: not copied): a vocab merge's tokenizer
        self.token = token
        self.temp = self.folder.parent / f".{self.folder.name}{TEMP_MARK}{token}"
        shutil.rmtree(self.temp, ignore_errors=True)
        self._lock = FileLock(self.temp / FOLDER_LOCK)
        self.writers: list[SafetensorsWriter] = []
        try:  # a signal landing anywhere in here removes the temp folder
            self.temp.mkdir(parents=True)
            self._lock.acquire()
            unfinished.add(self)
            shards = _split(tensors, shard_size)
            self.names = [single_name] if len(shards) == 1 else [
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for i, (n, shard) in enumerate(zip(self.names, shards)):  # one sha256 over the shards in turn
                self.writers.append(SafetensorsWriter(self.temp / n, shard, draft_metadata, token, hash_as_written=i == 0))
        except BaseException:
            self.abort()
            raise
        self.where = {t[0]: w for w, shard in zip(self.writers, shards) for t in shard}
        self.total = sum(nbytes(dt, shape) for _, dt, shape in tensors)

    def write(self, name: str, data, at: int = 0) -> bool:
        return self.where[name].write(name, data, at)

    def copy_into(self, name: str, source, offset: int) -> None:
        self.where[name].copy_into(name, source, offset)

    def placement(self, name: str) -> tuple[Path, int]:
        """The final file tensor `name` lands in, and its offset there."""
        w = self.where[name]
        return self.folder / w.path.name, w.position(name)

    def mark_done(self, name: str) -> None:
        self.where[name].mark_done(name)

    def data_sha256(self):
        h = None
        for w in self.writers:
            h = w.data_sha256(h)
        return h

    def commit(self, metadata: dict[str, str]) -> list[Path]:
        """Finish every file and swap the folder into place; the final paths of the shards."""
        for w in self.writers:
            w.commit(metadata)
        if len(self.writers) > 1:
            weight_map = {t: w.path.name for t, w in self.where.items()}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.temp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if self.copy_from is not None:
            for name in CONFIG_FILES:
                if (self.copy_from / name).is_file():
                    shutil.copy2(self.copy_from / name, self.temp / name)
        if self.config is not None:
            (self.temp / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        for name, data in self.files.items():
            if data is None:
                (self.temp / name).unlink(missing_ok=True)
            else:
                (self.temp / name).write_bytes(data)
        self._write_manifest()
        self._swap_in()
        return [self.folder / w.path.name for w in self.writers]

    def _write_manifest(self) -> None:
        files = {}
        for p in sorted(self.temp.iterdir()):
            if p.name in (FOLDER_LOCK, MANIFEST) or p.name.startswith("."):
                continue
            st = p.stat()
            files[p.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "xxh3": file_hash(p)}
        doc = {"written_by": "mergebuild", "files": files}
        (self.temp / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")

    def _swap_in(self) -> None:
        """Replace the old folder (checked once more: only files mergebuild wrote) by the new."""
        old = None
        if self.folder.exists():
            foreign = foreign_files(self.folder)
            if foreign:
                raise BuildError(f"{self.folder}: files appeared during the build that mergebuild did not write "
                                 f"({', '.join(foreign[:3])}); the folder was left as it was")
            old = self.folder.parent / f".{self.folder.name}.mergebuild-old-{self.token}"
            replace(self.folder, old)
        self._lock.release()
        (self.temp / FOLDER_LOCK).unlink(missing_ok=True)
        replace(self.temp, self.folder)
        fsync_dir(self.folder.parent)
        unfinished.discard(self)
        if old is not None:
            _remove_written(old)

    def salvage(self, packs) -> list[tuple[str, Path, int]]:
        """Move each shard's finished tensors into the cache: (name, pack, offset)."""
        out = []
        for w in self.writers:
            pack = packs()
            rows = w.salvage(pack)
            out += [(n, pack, o) for n, o in rows or []]
        return out

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
        self._lock.release()
        shutil.rmtree(self.temp, ignore_errors=True)
        unfinished.discard(self)


def _remove_written(folder: Path) -> None:
    """Delete a replaced folder: what its manifest lists, then the folder if nothing is left."""
    listed = read_manifest(folder) or {}
    for name in list(listed) + [MANIFEST]:
        (folder / name).unlink(missing_ok=True)
    for p in list(folder.iterdir()):
        if _legacy_ours(folder, p.name):
            p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else is in it: it stays, under its hidden name


def remove_output(path: Path) -> tuple[list[Path], list[str]]:
    """`clean`: remove what mergebuild wrote at an output path; (removed, kept as not ours)."""
    path = Path(path)
    if not path.exists():
        return [], []
    if not is_folder_output(path):
        if path.is_file() and written_by_mergebuild(path):
            path.unlink()
            return [path], []
        return [], [path.name]
    if not path.is_dir():
        return [], [path.name]
    foreign = foreign_files(path)
    listed = read_manifest(path)
    removed = []
    names = list(listed) if listed is not None else [p.name for p in path.iterdir() if _legacy_ours(path, p.name)]
    for name in names:
        if name not in foreign and (path / name).is_file():
            (path / name).unlink()
            removed.append(path / name)
    (path / MANIFEST).unlink(missing_ok=True)
    try:
        path.rmdir()
        removed.append(path)
    except OSError:
        pass
    return removed, foreign


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

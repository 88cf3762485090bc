"""An output being written: the one copy of a target's tensors.

A target's tensors are written once, into the output itself (a temp file beside it, renamed at
commit); the index then locates each tensor in the committed file, and the next rebuild copies
the unchanged ones from it, kernel-side, instead of keeping a second copy in the cache. So a
one-block tweak adds to the cache only what changed upstream. If the build is interrupted, the
tensors already written are moved into the cache (a pack) and recorded there, so the next
build computes only the rest.
"""

from __future__ import annotations

import threading
from pathlib import Path

from mergebuild.methods import peft
from mergebuild.planning.planner import MergePlan, Plan
from mergebuild.planning.vocab import output_files
from mergebuild.portable import RandomAccess, same_device
from mergebuild.store.cache import Cache
from mergebuild.tensors.folder import FolderWriter, is_folder_output, output_marker
from mergebuild.tensors.writer import SafetensorsWriter, remove_stale_temps, unfinished

ADAPTER_SHARD = 1 << 62  # PEFT loads one adapter_model.safetensors: an adapter is never sharded


class OutputSink:
    def __init__(self, cache: Cache, target: Path, tensors: list, draft_metadata: dict, shard_size: int,
                 config_folder: Path | None, config: dict | None = None, files: dict | None = None,
                 single_name: str | None = None):
        self.cache, self.target = cache, Path(target)
        self.folder = is_folder_output(self.target)
        if self.folder:
            named = {"single_name": single_name} if single_name else {}
            self.writer = FolderWriter(self.target, tensors, draft_metadata, shard_size, config_folder, cache.token,
                                       config, files, **named)
        else:
            self.writer = SafetensorsWriter(self.target, tensors, draft_metadata, cache.token)
        self.digests: dict[str, str] = {}  # tensor name -> digest, as each is written
        self._lock = threading.Lock()

    def release_to(self, release) -> None:
        """Bytes that write() reported kept go to `release` once the writer is done with them."""
        for w in self.writer.writers if self.folder else [self.writer]:
            w.release = release

    def write(self, name: str, digest: str, data) -> bool:
        """True when the writer keeps `data` (to hash it later): it must not be written over."""
        kept = self.writer.write(name, data)
        self._written(name, digest)
        return kept

    def write_piece(self, name: str, data, at: int) -> None:
        """A part of tensor `name`'s bytes, from byte `at` (execute/pieces.py)."""
        self.writer.write(name, data, at)

    def finish_pieces(self, name: str, digest: str) -> None:
        """Every part of tensor `name` is written."""
        self.writer.mark_done(name)
        self._written(name, digest)

    def copy_into(self, name: str, digest: str, source: RandomAccess, offset: int) -> None:
        self.writer.copy_into(name, source, offset)
        self._written(name, digest)

    def _written(self, name: str, digest: str) -> None:
        with self._lock:
            self.digests[name] = digest

    def data_sha256(self) -> str:
        return self.writer.data_sha256().hexdigest()

    def commit(self, metadata: dict[str, str]) -> None:
        """Put the output in place and record where each of its tensors is (replacing what was
        recorded of its previous version: a folder re-sharded has other files)."""
        for path, (_, kind, owner) in self.cache.index.files("output").items():
            if owner == str(self.target):
                self.cache.forget_file(path)
        if self.folder:
            shards = self.writer.commit(metadata)
            for w, final in zip(self.writer.writers, shards):
                self._record(final, [(self.digests[n], w.position(n)) for n in w.slots if n in self.digests])
            self._record(output_marker(self.target), [])
        else:
            self.writer.commit(metadata)
            w = self.writer
            self._record(self.target, [(self.digests[n], w.position(n)) for n in w.slots if n in self.digests])

    def _record(self, path: Path, rows: list[tuple[str, int]]) -> None:
        self.cache.save_file(path, "output", str(self.target), rows)

    def salvage(self) -> dict[str, str]:
        """On interrupt: keep the tensors already written, in the cache; {name: digest} kept."""
        kept: dict[str, str] = {}
        writers = self.writer.writers if self.folder else [self.writer]
        for w in writers:
            done = [n for n in w.done_names() if n in self.digests]
            if not done:
                w.abort()
                continue
            pack = self.cache.new_pack()
            moved = w.salvage(pack) if same_device(w.temp, pack.parent) else None
            if moved is not None:
                self.cache.save_file(pack, "pack", str(self.target), [(self.digests[n], o) for n, o in moved
                                                                      if n in self.digests])
                kept.update({n: self.digests[n] for n, _ in moved if n in self.digests})
            else:  # another file system: copy the finished tensors into blobs
                kept.update(self._to_blobs(w, done))
                w.abort()
        if self.folder:
            self.writer.abort()
        return kept

    def _to_blobs(self, w: SafetensorsWriter, names: list[str]) -> dict[str, str]:
        kept, rows = {}, []
        for n in names:
            data = w.file.read(w.slots[n].nbytes, w.position(n))
            rows.append((self.digests[n], self.cache.blobs.put(self.digests[n], data), "salvage"))
            kept[n] = self.digests[n]
        self.cache.index.save_blobs([r for r in rows if r[1]], 0)
        return kept

    def abort(self) -> None:
        self.writer.abort()


def abort_unfinished(cache: Cache) -> None:
    """Remove the temp outputs of this process that nothing committed, salvaged or aborted: a
    stop signal can land after a writer is made and before the code that would clean it up owns
    it. Run when a build ends (after a success there are none)."""
    unfinished.abort_all(cache.token)


def open_sink(plan: Plan, cache: Cache, draft: dict[str, str], merge: MergePlan, release=None) -> OutputSink:
    """The output of a merge, opened for writing (a temp file beside it), with a draft header
    whose size the final one fits in; `release`: see OutputSink.release_to."""
    remove_stale_temps(merge.spec.output)
    sink = _new_sink(plan, cache, draft, merge)
    if release is not None:
        sink.release_to(release)
    return sink


def _new_sink(plan: Plan, cache: Cache, draft: dict[str, str], merge: MergePlan) -> OutputSink:
    tensors = [(t.name, t.dtype, t.shape) for t in merge.tasks.values()]
    if merge.adapter is not None:  # a PEFT adapter folder: one weights file and its config, nothing copied
        return OutputSink(cache, merge.spec.output, tensors, draft, ADAPTER_SHARD, None, None,
                          {peft.CONFIG_NAME: peft.config_bytes(merge.adapter)}, single_name=peft.WEIGHTS_NAME)
    return OutputSink(cache, merge.spec.output, tensors, draft, merge.spec.shard_size,
                      _config_folder(plan, merge), plan.written_config(merge.spec.name),
                      output_files(plan, merge))  # a vocab merge's tokenizer (planning/vocab.py)


def _config_folder(plan: Plan, merge: MergePlan) -> Path | None:
    """The model folder whose config files the output copies: the first input's, up the chain."""
    node = merge.spec.inputs[0]
    while node in plan.merges:
        node = plan.merges[node].spec.inputs[0]
    if node not in plan.sources:  # a computed source (a Fisher) has no folder
        return None
    path = plan.sources[node].path
    return path if path.is_dir() else None

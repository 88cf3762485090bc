"""Committing outputs: the hashes their metadata needs, the metadata, and what the index learns.

Source files' sha256 (lineage, A1111's hashes) and LoRA files' addnet hashes are computed in
the background while the build runs, unless the per-user fingerprint store knows them (any
project or cache on this machine hashed the file); an output's commit waits only for the hashes
of its own sources. So are the sha256 of the output files upstream of an output (a merge with a
file of its own that feeds another): written earlier in the build (hashed from its commit on,
while the next merge computes), or current, their hash recorded in the index or the store (else
hashed once). Those hashes reach the metadata only, never a tensor's cache key. The header's
space is reserved from a draft whose placeholders are exactly as long as those hashes, so its
size is known before any compute.

An output nothing in the build reads is not hashed after its commit: its sha256 / AutoV2 is
computed where something asks for it (`inspect`, `lineage`, `import`, a later build that reads
it) and then remembered; mergefile.lock carries it when it is known (docs/caching.md).
"""

from __future__ import annotations

from concurrent.futures import Future

from mergebuild.portable import file_stamp
from mergebuild.record.lineage import SourceHashes, build_metadata, has_file, today
from mergebuild.planning.planner import MergePlan, Plan
from mergebuild.store.cache import Cache
from mergebuild.planning.sources import remember_sha256, remember_written
from mergebuild.store.fingerprints import user_store
from mergebuild.record.hashes import file_sha256, known_hashes, legacy_hash, remembered_data_sha256, remembered_sha256
from mergebuild.tensors.folder import output_marker


def lora_files(plan: Plan) -> set[str]:
    """Sources read as LoRA files (by a lora method, after its first input): their lineage
    carries kohya's hash of the tensor data too."""
    out = set()
    for merge in plan.merges.values():
        if merge.spec.method.startswith("lora"):
            first = 0 if merge.spec.method != "lora" else 1
            out |= {n for n in merge.spec.inputs[first:] if n in plan.sources and plan.sources[n].path.is_file()}
    return out


def output_date(cache: Cache, merge: MergePlan) -> str:
    """The ModelSpec date: kept from the last build of the same recipe (an output rebuilt with
    nothing changed keeps its bytes), else today."""
    recorded = cache.index.output(str(merge.spec.output))
    return recorded[1] if recorded is not None and recorded[0] == merge.identity else today()


class Committer:
    def __init__(self, plan: Plan, cache: Cache, hashers, warnings: list[str], build_id: int = 0):
        self.plan, self.cache, self.hashers, self.warnings = plan, cache, hashers, warnings
        self.build_id = build_id
        self.loras = lora_files(plan)
        self._sha256: dict[str, Future] = {}
        self._addnet: dict[str, Future] = {}
        self.output_sha256: dict[str, Future] = {}
        self._output_stamps: dict[str, tuple] = {}  # of the files written, as committed
        self._upstream: dict[str, Future] = {}  # current output files upstream of one written
        self._read_downstream: set[str] = set()  # merges whose output file a written output's lineage names
        if any(m.needed and m.spec.output is not None and not m.current for m in plan.merges.values()):
            self._start_source_hashes()
            self._start_upstream_hashes()

    def _start_source_hashes(self) -> None:
        for name, source in self.plan.sources.items():
            if source.sha256 is None:
                self._sha256[name] = self.hashers.submit(file_sha256, source.hash_file)
        for name in self.loras:
            self._addnet[name] = self.hashers.submit(remembered_data_sha256, self.plan.sources[name].path)

    def _upstream_files(self, name: str) -> list[str]:
        return [n for n in self.plan.recipe.closure(name) if n != name and n in self.plan.merges
                and has_file(self.plan, n)]

    def _start_upstream_hashes(self) -> None:
        """The sha256 of the current output files that outputs to write are made from: known to
        the index for the file as it is, else hashed (once: the index keeps it)."""
        written = [m for m in self.plan.merges.values() if m.needed and m.spec.output is not None and not m.current]
        for name in sorted({n for m in written for n in self._upstream_files(m.spec.name)}):
            merge = self.plan.merges[name]
            if not merge.current:
                self._read_downstream.add(name)  # written by this build, before its readers: hashed at its commit
                continue
            path = merge.spec.output
            try:
                stamp = file_stamp(path)
            except OSError:
                continue
            known = self.cache.index.output_sha256(str(path), stamp)
            if known is not None:
                self._upstream[name] = _done(known)
            else:
                self._upstream[name] = self.hashers.submit(remembered_sha256, path)
                self._output_stamps[name] = stamp

    def _output_hash(self, name: str) -> str:
        future = self.output_sha256.get(name) or self._upstream.get(name)
        sha = future.result() if future is not None else remembered_sha256(self.plan.merges[name].spec.output)
        self._save_output_hash(name, sha)
        return sha

    def _save_output_hash(self, name: str, sha: str) -> None:
        path = self.plan.merges[name].spec.output
        stamp = self._output_stamps.pop(name, None)
        try:
            if stamp is not None and file_stamp(path) == stamp:  # still the file that was hashed
                self.cache.index.save_output_sha256(str(path), stamp, sha)
        except OSError:
            pass

    def draft_metadata(self, merge: MergePlan) -> dict[str, str]:
        hashes = SourceHashes.placeholders(self.plan, self.loras)
        return build_metadata(self.plan, merge.spec.name, hashes, "0" * 64, output_date(self.cache, merge))

    def commit(self, merge: MergePlan, sink) -> None:
        name = merge.spec.name
        sources = [n for n in self.plan.recipe.closure(name) if n in self.plan.sources]
        upstream = self._upstream_files(name)
        hashes = SourceHashes(
            sha256={n: self._source_sha256(n) for n in sources},
            legacy={n: legacy_hash(self.plan.sources[n].hash_file) for n in sources},
            addnet={n: self._addnet[n].result() for n in self.loras if n in self._addnet},
            outputs={n: self._output_hash(n) for n in upstream},
            output_legacy={n: legacy_hash(self.plan.merges[n].spec.output) for n in upstream},
            loras=self.loras)
        for n, h in hashes.addnet.items():
            self.plan.sources[n].addnet_hash = h
        date = output_date(self.cache, merge)
        metadata = build_metadata(self.plan, name, hashes, sink.data_sha256(), date, self.warnings)
        self._keep_replaced(str(merge.spec.output), set(sink.digests.values()))
        sink.commit(metadata)
        self.cache.index.save_output(str(merge.spec.output), merge.identity, date, str(output_marker(merge.spec.output)))
        self._drop_salvaged(str(merge.spec.output))
        merge.current = True
        if has_file(self.plan, name):
            self._output_stamps[name] = file_stamp(merge.spec.output)
            remember_written(merge.spec.output, [(t.name, t.dtype, t.shape) for t in merge.tasks.values()],
                             sink.digests, metadata)
        if name in self._read_downstream:  # a later merge's lineage names it: hash it while that one computes
            self.output_sha256[name] = self.hashers.submit(remembered_sha256, output_marker(merge.spec.output))

    def output_hashes(self) -> dict[str, str]:
        """The sha256 of the outputs this build wrote, where known: hashed for a downstream
        lineage, or remembered (the file is never read for this alone)."""
        out = {name: future.result() for name, future in self.output_sha256.items()}
        for name, merge in self.plan.merges.items():
            if name in out or merge.spec.output is None or not merge.current:
                continue
            marker = output_marker(merge.spec.output)
            try:
                known = self.cache.index.output_sha256(str(marker), file_stamp(marker)) or known_hashes(marker)[0]
            except OSError:
                known = None
            if known is not None:
                out[name] = known
        return out

    def _keep_replaced(self, owner: str, new: set[str]) -> None:
        """The tensors the new output replaces, moved from the old output into blobs before it
        goes: a tweak undone, or a tune trial repeated, costs nothing. Only the changed tensors,
        so the cache grows by about what changed, and eviction takes these first."""
        from mergebuild.portable import RandomAccess
        from mergebuild.store.hashing import tensor_digest
        from mergebuild.dtypes import nbytes

        for path, (_, kind, who) in self.cache.index.files("output").items():
            if who != owner or not self.cache._file_valid(path):
                continue
            gone = [(d, o) for d, o in self.cache.index.located_in(path) if d not in new and not self.cache.blobs.has(d)]
            shapes = self.cache.index.shapes_of([d for d, _ in gone])
            rows = []
            with RandomAccess(path) as f:
                for digest, offset in gone:
                    if digest not in shapes:
                        continue
                    dtype, shape = shapes[digest]
                    data = f.read(nbytes(dtype, shape), offset)
                    if tensor_digest(dtype, shape, data) == digest:
                        rows.append((digest, self.cache.blobs.put(digest, data), "replaced"))
            self.cache.index.save_blobs([r for r in rows if r[1]], self.build_id)

    def _drop_salvaged(self, owner: str) -> None:
        """Packs salvaged from interrupted builds of this output: it holds their tensors now."""
        for path, (_, kind, who) in self.cache.index.files("pack").items():
            if who == owner:
                self.cache.forget_file(path)
                try:
                    import os

                    os.unlink(path)
                except OSError:
                    pass

    def _source_sha256(self, name: str) -> str:
        source = self.plan.sources[name]
        if source.sha256 is None:
            source.sha256 = self._sha256[name].result()
        return source.sha256

    def save_source_hashes(self) -> None:
        """What the build learnt: the sources' sha256, and the sha256 of the output files."""
        for name, future in self._sha256.items():
            remember_sha256(self.plan.sources[name], self.cache, future.result())
        problem = user_store().take_warning()  # the store failed only now: said once
        if problem:
            self.warnings.append(problem)
        for name, future in list(self.output_sha256.items()) + list(self._upstream.items()):
            if name in self._output_stamps:
                self._save_output_hash(name, future.result())

    def cancel(self) -> None:
        for future in list(self._sha256.values()) + list(self._addnet.values()) + list(self._upstream.values()):
            future.cancel()


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future

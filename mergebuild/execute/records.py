"""What a build tells the index, and when: only what is stored and trustworthy.

A computed tensor's entry (key -> digest) is recorded only once its bytes are stored (a blob, a
committed output, a salvaged pack) and every source file has been re-checked since it was
read: a source rewritten during the build records nothing computed from it, so the cache is
never poisoned. After the build: which entries and blobs were used (least recently used go
first), what each merge needs (protected from eviction), and the recipe each was built from.
"""

from __future__ import annotations

import threading
from pathlib import Path

from mergebuild.errors import BuildError
from mergebuild.portable import file_stamp


class Records:
    def __init__(self, plan, cache, build_id: int):
        self.plan, self.cache, self.build_id = plan, cache, build_id
        self._rows: list[tuple] = []  # (key, digest, dtype, shape) with stored bytes
        self._stats: list[tuple[str, dict]] = []  # (key, statistics) of computed tensors
        self._blobs: list[tuple[str, int, str]] = []
        self._pending: dict[str, dict[str, tuple]] = {}  # merge -> tensor -> row, awaiting its output
        self._read_from: set[Path] = set()  # recorded files copied from (outputs, packs)
        self._used_keys: list[str] = []
        self._used_digests: list[str] = []
        self._lock = threading.Lock()

    # while merges run ---------------------------------------------------------------------
    def stored(self, task, digest: str, disk: int) -> None:
        with self._lock:
            self._rows.append((task.key, digest, task.dtype, task.shape))
            if task.stats is not None:
                self._stats.append((task.key, task.stats))
            if disk:
                self._blobs.append((digest, disk, "merge"))

    def stored_row(self, key: str, digest: str, dtype: str, shape: tuple, disk: int) -> None:
        """A stored blob that is not a task's (a statistic's output: execute/statistics.py)."""
        with self._lock:
            self._rows.append((key, digest, dtype, shape))
            if disk:
                self._blobs.append((digest, disk, "merge"))

    def in_output(self, merge: str, task, digest: str) -> None:
        with self._lock:
            self._pending.setdefault(merge, {})[task.name] = (task.key, digest, task.dtype, task.shape, task.stats)

    def committed(self, merge: str, sink) -> None:
        with self._lock:
            self._take(self._pending.pop(merge, {}).values())

    def salvaged(self, merge, kept: dict[str, str]) -> None:
        with self._lock:
            pending = self._pending.pop(merge.spec.name, {})
            self._take(pending[n] for n in kept if n in pending)

    def _take(self, rows) -> None:
        for key, digest, dtype, shape, stats in rows:
            self._rows.append((key, digest, dtype, shape))
            if stats is not None:
                self._stats.append((key, stats))

    def read_from(self, path: Path) -> None:
        with self._lock:
            self._read_from.add(Path(path))

    def changed_files(self) -> list[Path]:
        """Sources, and recorded files copied from, that are no longer as they were."""
        changed = [p for s in self.plan.sources.values() for p in s.changed_parts()]
        recorded = self.cache.index.files()
        with self._lock:
            copied = list(self._read_from)
        for path in copied:
            row = recorded.get(str(path))
            try:
                now = file_stamp(path)
            except OSError:
                now = None
            if row is None or now != tuple(row[0]):
                changed.append(path)
        return changed

    def discard(self) -> None:
        with self._lock:
            self._rows, self._blobs, self._pending, self._stats = [], [], {}, []

    @staticmethod
    def changed_error(changed: list[Path]) -> BuildError:
        shown = ", ".join(str(p) for p in changed[:3])
        return BuildError(f"{shown}: changed during the build; nothing computed from it was recorded and no "
                          "output was written (run the build again once nothing writes to it)")

    def verify_sources(self) -> None:
        changed = self.changed_files()
        if changed:
            self.discard()
            raise self.changed_error(changed)
        with self._lock:
            self._read_from.clear()

    def flush(self) -> None:
        with self._lock:
            rows, blobs, stats = self._rows, self._blobs, self._stats
            self._rows, self._blobs, self._stats = [], [], []
        if blobs:
            self.cache.index.save_blobs(blobs, self.build_id)
        if rows:
            self.cache.index.record(rows, self.build_id)
            self.cache.share(rows)  # to the remote tier too, blob then entry (store/remote.py)
        if stats:
            self.cache.index.save_stats(stats)

    def used(self, merge) -> None:
        with self._lock:
            for t in merge.tasks.values():
                if t.key:
                    self._used_keys.append(t.key)
                if t.digest:
                    self._used_digests.append(t.digest)
            computed = [self.plan.statistics[n] for n in dict.fromkeys(merge.spec.inputs) if n in self.plan.statistics]
            for stat in [merge.statistic, *computed]:  # its own and the computed sources it reads
                if stat is not None and stat.key is not None:
                    self._used_keys += [stat.output_key(n) for n in stat.digests]
                    self._used_digests += [d for d in stat.digests.values() if d]
            for node, tensor in (i for t in merge.tasks.values() for i in t.inputs):
                if node in self.plan.sources and self.plan.sources[node].tensors[tensor].file is None:
                    self._used_digests.append(self.plan.sources[node].tensors[tensor].digest)

    # after the build ----------------------------------------------------------------------
    def save_state(self, ran: dict) -> None:
        """Touch what was used; per merge that ran, what it needs, what it was made from, and its
        run (counts, seconds, statistics by block) for the report."""
        index = self.cache.index
        index.touch(self._used_keys, self._used_digests, self.build_id)
        mergefile = str(self.plan.mergefile.path)
        keep = set(self.plan.mergefile.merges)
        for name, result in ran.items():
            index.save_run(mergefile, name, self.build_id, self._run(name, result))
            merge = self.plan.merges[name]
            needs = {t.digest for t in merge.tasks.values() if t.digest}
            needs |= set(merge.statistic.digests.values()) if merge.statistic is not None else set()
            needs |= {d for n in merge.spec.inputs if n in self.plan.statistics
                      for d in self.plan.statistics[n].digests.values()}
            needs |= {self.plan.ref(n, t).digest for task in merge.tasks.values() for n, t in task.inputs
                      if n in self.plan.sources and self.plan.sources[n].tensors[t].file is None}
            index.save_live(mergefile, name, {d for d in needs if d}, keep)
            closure = self.plan.recipe.closure_identities(name)
            nodes = {i: self._stored_node(n) for n, i in closure.items()}
            index.save_closure(mergefile, name, closure, nodes)

    def _run(self, name: str, result) -> dict:
        from mergebuild.execute.stats import add, metrics
        from mergebuild.layouts.blocks import group_of

        merge = self.plan.merges[name]
        base = self.plan.mergefile.settings.time_embed == "BASE"
        keyed = {t.key: t for t in merge.tasks.values() if t.key}
        known = self.cache.index.stats_of(list(keyed))
        blocks: dict[str, dict] = {}
        for key, stats in known.items():
            group = group_of(merge.arch, keyed[key].name, base) if merge.arch else "other"
            add(blocks.setdefault(group, {}), stats)
        return {"computed": result.computed, "reused": result.reused, "tensors": result.tensors,
                "seconds": round(result.seconds, 3), "architecture": result.architecture, "written": result.written,
                "blocks": {g: metrics(total) for g, total in blocks.items()}}

    def _stored_node(self, name: str) -> dict:
        node = dict(self.plan.recipe.nodes[name])
        source = self.plan.sources.get(name)
        if source is not None and source.sha256:
            node["sha256"] = source.sha256
        return node

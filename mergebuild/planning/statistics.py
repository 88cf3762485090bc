"""Whole-model statistics: the first phase of a two-phase merge (re-basin's permutations).

A method may declare one statistic per merge (Method.statistic -> PlannedStatistic). It is a
node of the plan, named `<merge>#<statistic>`, whose tensors the merge's tasks read as inputs.
Its key hashes its name, version, parameters, the compute dtype, the digests of every tensor it
reads and any extra data digests; each of its output tensors is an entry of the index under
hash(key, tensor name), its bytes a blob like any intermediate. So the statistic is computed
once (execute/statistics.py), read back by later builds, recomputed exactly when something it
read changes, and a task's key changes exactly when the statistic's tensors it reads do (early
cutoff holds: a recomputed but identical permutation dirties nothing). Planning computes
nothing and never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mergebuild.methods.registry import PlannedStatistic
from mergebuild.planning.sources import TensorRef
from mergebuild.store.hashing import text_digest

CACHED, DIRTY, PENDING = "cached", "dirty", "pending"


@dataclass
class StatisticTask:
    node: str  # "<merge>#<name>": how tasks name it in their inputs
    merge: str
    spec: PlannedStatistic
    reads: tuple[tuple[str, str], ...]  # (node, tensor) of everything it reads
    key: str | None = None
    state: str = PENDING
    digests: dict[str, str | None] = field(default_factory=dict)  # output name -> digest once known
    seconds: float | None = None  # how long compute took, when this build ran it
    # a computed source's (planning/computed.py): the nodes its reads index, and its table;
    # empty: its merge's inputs and [merges.<merge>]
    inputs: tuple[str, ...] = ()
    where: str = ""

    @property
    def table(self) -> str:
        """The Mergefile table it belongs to, for messages: models.<name> or merges.<merge>."""
        return self.where or f"merges.{self.merge}"

    def ref(self, name: str) -> TensorRef:
        dtype, shape = self.spec.outputs[name]
        return TensorRef(dtype, tuple(shape), self.digests.get(name))

    def output_key(self, name: str) -> str:
        return text_digest(json.dumps([self.key, name]))

    def describe(self) -> dict:
        """What -n, explain and --json say of it."""
        inputs = sorted({n for n, _ in self.reads})
        return {"name": self.spec.name, "state": self.state, "reads": len(self.reads), "inputs": inputs,
                "data": dict(self.spec.data), "outputs": len(self.spec.outputs)}


def statistic_node(merge: str, name: str) -> str:
    return f"{merge}#{name}"


def plan_statistic(merge: str, inputs: list[str], spec: PlannedStatistic | None) -> StatisticTask | None:
    if spec is None:
        return None
    reads = tuple((inputs[i], name) for i, name in spec.reads)
    return StatisticTask(statistic_node(merge, spec.name), merge, spec, reads)


def statistic_key(stat: StatisticTask, compute_dtype: str, digests: list[str]) -> str:
    doc = [stat.spec.name, stat.spec.version, sorted(stat.spec.params.items()), compute_dtype,
           digests, sorted(stat.spec.data.items())]
    return text_digest(json.dumps(doc, separators=(",", ":"), default=str))


def resolve_statistic(plan, stat: StatisticTask, cache, force: bool = False) -> None:
    """Its key, state and output digests as far as its inputs are known (cached: every output
    has an entry whose bytes are stored)."""
    if stat.state == CACHED and stat.key is not None:
        return
    digests = [plan.ref(*r).digest for r in stat.reads]
    if None in digests:
        stat.key, stat.state, stat.digests = None, PENDING, {}
        return
    stat.key = statistic_key(stat, plan.compute_dtype, digests)
    keys = {name: stat.output_key(name) for name in stat.spec.outputs}
    # find_results: in this cache, else in the remote tier (fetched and verified when read)
    found = {} if force else cache.find_results({keys[n]: stat.spec.outputs[n] for n in keys})
    if all(k in found for k in keys.values()):
        stat.digests, stat.state = {n: found[k] for n, k in keys.items()}, CACHED
    else:
        stat.digests, stat.state = {}, DIRTY

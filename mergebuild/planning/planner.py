"""The plan: for every merge, one task per output tensor, with its cache key and state.

A tensor's cache key hashes the method name and version, the parameters resolved for that tensor,
the compute and output dtypes and the digests of the input tensors it reads. An upstream tensor's
digest is the digest of its *result*, so a recomputed tensor that comes out identical leaves its
readers clean (early cutoff). Planning reads headers, fingerprints and the index only: it never
imports torch, so a no-op build stays fast (except lora_extract's adaptive ranks, which compute
singular values once, then read them back: planning/spectra.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.dtypes import USER_DTYPES, is_float, nbytes
from mergebuild.errors import InputError, MergefileError
from mergebuild.methods.parts import POSITION_IDS
from mergebuild.methods.registry import STATISTIC, Method, get_method
from mergebuild.planning.graph import build_graph, build_order
from mergebuild.layouts.blocks import Architecture, detect
from mergebuild.planning.outputs import check_outputs
from mergebuild.planning.params import ParamResolver
from mergebuild.planning.recipe import Recipe, merge_node, model_node
from mergebuild.planning.sources import Source, TensorRef, load_source
from mergebuild.planning.statistics import StatisticTask, plan_statistic, resolve_statistic
from mergebuild.planning.vocab import node_fields, plan_vocab, shape_hint, vocab_tasks
from mergebuild.mergefile.model import Mergefile, MergeSpec
from mergebuild.store.cache import Cache
from mergebuild.store.hashing import text_digest
from mergebuild.tensors.folder import is_folder_output

POSITION_IDS_SUFFIX = "embeddings.position_ids"

CACHED, DIRTY, PENDING, PASSTHROUGH = "cached", "dirty", "pending", "passthrough"


@dataclass
class TensorTask:
    name: str
    dtype: str  # of the result
    shape: tuple[int, ...]
    inputs: tuple[tuple[str, str], ...]  # (node, tensor name) per input
    method: Method | None  # None: the result is the first input's tensor, unchanged
    params: dict = field(default_factory=dict)
    channels: int | None = None  # inpainting: merge only [:, :channels], keep the rest of A
    clip: bool = False  # clamp the result to the inputs' elementwise range (weights_clip)
    key: str | None = None
    digest: str | None = None
    state: str = PENDING
    stats: dict | None = None  # how far the result moved from each input (execute/stats.py), once computed

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class MergePlan:
    spec: MergeSpec
    method: Method
    tasks: dict[str, TensorTask]
    arch: Architecture | None = None
    arch_how: str = ""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_metadata: dict[str, str] = field(default_factory=dict)
    block_sensitive: bool = False  # a value depends on the block (so [settings] time_embed reaches it)
    identity: str = ""  # of its recipe node and everything upstream (planning/recipe.py)
    current: bool = False  # a target whose output a build would leave byte for byte as it is
    needed: bool = True  # the build runs it: its output is stale, or a merge that runs reads it
    stale_why: str = ""  # why its output is not current ("missing", "changed on disk", ...)
    # the config.json a folder output writes in place of its first input's, when the method
    # changes it (passthrough's layer count); None: the first input's config files as they are
    config: dict | None = None
    vocab: object = None  # planning/vocab.VocabPlan: the merge's vocabulary (vocab / tokenizer_source)
    # the adapter_config.json of a merge that makes a PEFT adapter (lora_merge, lora_extract with
    # format "peft"): its folder output is an adapter folder, and its readers take scales from it
    adapter: dict | None = None
    statistic: StatisticTask | None = None  # the whole-model statistic its tasks read (planning/statistics.py)

    def count(self, state: str) -> int:
        return sum(1 for t in self.tasks.values() if t.state == state)

    @property
    def method_tasks(self) -> int:
        return sum(1 for t in self.tasks.values() if t.method is not None)


@dataclass
class Plan:
    mergefile: Mergefile
    order: list[str]  # models and merges, inputs first
    targets: list[str]
    sources: dict[str, Source]
    merges: dict[str, MergePlan]
    compute_dtype: str
    recipe: Recipe = field(default_factory=Recipe)
    cache_root: Path | None = None
    graph: object = None  # the Mergefile's DAG (planning/graph.py)
    cache: Cache | None = None  # for what a method's planner must compute (planning/spectra.py)
    statistics: dict[str, StatisticTask] = field(default_factory=dict)  # by node ("<merge>#<name>")

    def ref(self, node: str, tensor: str) -> TensorRef:
        """Where the bytes of a node's tensor are, as far as known now (a tensor passed through
        unchanged is its input's: followed without recursion, chains can be long)."""
        while node not in self.sources:
            if node in self.statistics:
                return self.statistics[node].ref(tensor)
            task = self.merges[node].tasks[tensor]
            if task.method is not None:
                return TensorRef(task.dtype, task.shape, task.digest)
            node, tensor = task.inputs[0]
        return self.sources[node].tensors[tensor]

    def config(self, node: str) -> dict | None:
        """The config.json a node stands for: the one a merge writes (its method changed it),
        else its first input's, up to a model folder's own (None: no folder has one)."""
        while node not in self.sources:
            if node in self.statistics:  # a computed source has none
                return None
            merge = self.merges[node]
            if merge.config is not None:
                return merge.config
            node = merge.spec.inputs[0]
        return self.sources[node].config

    def adapter(self, node: str) -> dict | None:
        """The PEFT adapter_config.json a node's tensors go with: an adapter folder's, or the one
        a merge writes; None for any other node."""
        if node in self.sources:
            return self.sources[node].adapter
        return self.merges[node].adapter

    def written_config(self, node: str) -> dict | None:
        """The config.json a folder output of `node` writes instead of copying its first input's:
        the nearest one a merge up its chain of first inputs changed; None: copied as it is."""
        while node in self.merges:
            if self.merges[node].config is not None:
                return self.merges[node].config
            node = self.merges[node].spec.inputs[0]
        return None

    def tensor_names(self, node: str) -> list[str]:
        if node in self.sources:
            return list(self.sources[node].tensors)
        if node in self.statistics:  # a computed source (planning/computed.py)
            return list(self.statistics[node].spec.outputs)
        return list(self.merges[node].tasks)


def make_plan(mf: Mergefile, cache: Cache, targets: list[str] | None = None, force: bool = False) -> Plan:
    """The plan of a build: every tensor's task, key and state. Which outputs are current and
    which merges must run is decided against what builds recorded (record.state)."""
    from mergebuild.planning import shortcut  # it builds on this module

    graph = build_graph(mf)
    targets = list(targets) if targets else mf.targets
    order = build_order(mf, graph, targets)
    check_outputs(mf, cache.root, order)
    sources = {n: load_source(mf.models[n], cache, f"models.{n}") for n in order
               if n in mf.models and mf.models[n].fisher is None}
    plan = Plan(mf, order, targets, sources, {}, USER_DTYPES[mf.settings.compute_dtype], cache_root=cache.root,
                graph=graph, cache=cache)
    for name in order:
        if name in mf.models and mf.models[name].fisher is not None:  # computed from data (computed.py)
            from mergebuild.planning.computed import fisher_node, plan_fisher  # its scripts' parsing: only here

            stat = plan.statistics[name] = plan_fisher(plan, mf.models[name])
            plan.recipe.add(name, fisher_node(mf.models[name], stat))
            resolve_statistic(plan, stat, cache, force)
        elif name in mf.models:
            plan.recipe.add(name, model_node(sources[name].path.name, sources[name].content))
        elif not shortcut.restore(plan, name, cache, force):  # planned before from the same inputs
            merge_plan = _plan_merge(plan, mf.merges[name])
            plan.merges[name] = merge_plan
            merge_plan.identity = plan.recipe.add(name, _node(plan, merge_plan))
            if merge_plan.statistic is not None:
                resolve_statistic(plan, merge_plan.statistic, cache, force)
            resolve_keys(plan, merge_plan, cache, force)
            shortcut.remember(plan, merge_plan, cache)
    return plan


def _node(plan: Plan, merge: MergePlan) -> dict:
    """The merge's recipe node: the Mergefile's fields and the settings that reach its tensors."""
    spec = merge.spec
    settings = {"compute_dtype": plan.mergefile.settings.compute_dtype}
    if merge.block_sensitive and merge.arch is not None and any(tag == "time_embed" for *_, tag in merge.arch.rules):
        settings["time_embed"] = plan.mergefile.settings.time_embed
    output = None
    if spec.output is not None:
        copy = plan.mergefile.settings.copy_metadata
        if copy is not True:  # the default is left out: identities from before the setting hold
            settings["copy_metadata"] = copy if isinstance(copy, bool) else list(copy)
        output = {"name": spec.output.name}
        if is_folder_output(spec.output):
            output["shard_size"] = spec.shard_size
    node = merge_node(spec, merge.method.version, settings, output)
    if merge.arch is not None and (merge.arch.aliases or merge.arch.groups):
        node["params"] = {k: _canonical_table(v, merge.arch) for k, v in node["params"].items()}
    node.update(node_fields(merge))  # the tokenizers a vocab / tokenizer_source merge read
    if merge.statistic is not None:  # its version and data reach the output's identity too
        stat = merge.statistic.spec
        node["statistic"] = {"name": stat.name, "version": stat.version, **({"data": stat.data} if stat.data else {})}
    return node


def _canonical_table(value, arch: Architecture):
    """A block table with its names as the architecture spells them (`"double_blocks.3."` is
    D03): two spellings of one recipe are one recipe, so respelling never rewrites an output."""
    if not isinstance(value, dict) or "gradient" in value:
        return value
    named = {}
    for key, v in value.items():
        name = key if key == "default" else (arch.group_name(key) or arch.canonical_block(key))
        named[name] = v
    return named


@dataclass
class MergeContext:
    """What a method's own planner (Method.plan_tasks) sees of a merge."""

    plan: Plan
    spec: MergeSpec
    arch: Architecture
    resolver: ParamResolver
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_metadata: dict[str, str] = field(default_factory=dict)  # extra __metadata__ of the output
    config: dict | None = None  # the output's config.json, when the method changes it (MergePlan.config)
    adapter: dict | None = None  # the adapter_config.json, when the method makes a PEFT adapter (MergePlan.adapter)

    def names(self, i: int) -> list[str]:
        return self.plan.tensor_names(self.spec.inputs[i])

    def ref(self, i: int, name: str) -> TensorRef:
        return self.plan.ref(self.spec.inputs[i], name)

    def metadata(self, i: int) -> dict[str, str]:
        node = self.spec.inputs[i]
        return self.plan.sources[node].metadata if node in self.plan.sources else {}

    def params(self, key: str) -> dict:
        return self.resolver.params(key)

    def input_config(self, i: int) -> dict | None:
        """Input i's config.json (a model folder's, or what an upstream merge writes), if any."""
        return self.plan.config(self.spec.inputs[i])

    def singular_values(self, key: str, rows, swap: bool, count: int) -> tuple[float, list[float]]:
        """(sum of s_i^2, the count largest s_i) of input 0's key minus input 1's, computed while
        planning and remembered (lora_extract's energy and sv_epsilon: planning/spectra.py)."""
        from mergebuild.planning.spectra import singular_values

        what = f"{key} of {self.spec.inputs[0]} or {self.spec.inputs[1]}"
        return singular_values(self.plan, self.ref(0, key), self.ref(1, key), rows, swap, count, what)

    def input_adapter(self, i: int) -> dict | None:
        """Input i's PEFT adapter_config.json (an adapter folder's, or what a merge writes), if any."""
        return self.plan.adapter(self.spec.inputs[i])

    def out_dtype(self, dtype: str) -> str:
        return USER_DTYPES[self.spec.dtype] if self.spec.dtype and is_float(dtype) else dtype

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def note(self, text: str) -> None:
        """Information the build prints (e.g. how many LoRA modules were applied)."""
        self.notes.append(text)


def _plan_merge(plan: Plan, spec: MergeSpec) -> MergePlan:
    method = get_method(spec.method)
    for key, value in spec.params.items():  # a word (k = "auto") is resolved before planning
        param = method.param(key)
        if param is not None and isinstance(value, str) and value in param.words:
            raise MergefileError(plan.mergefile.path, f"merges.{spec.name}", key,
                                 f"{value!r} is chosen before planning by the CLI (mergebuild build, -n, status, "
                                 "explain) or mergebuild.api.build; give a number here")
    first = spec.inputs[0]
    names = plan.tensor_names(first)
    arch, how = detect(names, plan.config(first))
    resolver = ParamResolver(plan.mergefile, spec, method, arch, names)
    discard = re.compile(spec.discard) if spec.discard else None
    ctx = MergeContext(plan, spec, arch, resolver)
    vocab = plan_vocab(ctx, method, names)  # None unless the merge sets vocab / tokenizer_source
    statistic = _plan_statistic(ctx, method)
    if method.plan_tasks is not None:
        tasks = _method_planned(ctx, method)
    else:
        tasks = _key_by_key(plan, spec, method, [n for n in names if vocab is None or n not in vocab.keys], resolver)
    if vocab is not None and vocab.keys:  # vocabulary rows that move: planning/vocab.py
        tasks = dict(sorted({**tasks, **vocab_tasks(ctx, method, vocab, arch.rule_applies(names))}.items()))
    if discard:
        tasks = {n: t for n, t in tasks.items() if not discard.search(n)}
    if method.plan_tasks is None and method.input_names is None:
        _keep_markers(plan, spec, names, tasks, ctx)
    ctx.warnings += resolver.unused(names)
    for group, count in resolver.outside_blocks.items():
        ctx.note(f"{count} {group} keys are in no block and the block values have no default: kept from "
                 f"{spec.inputs[0]} (a block table with a default, or a rule whose regex matches them, merges them)")
    merge = MergePlan(spec, method, tasks, arch=arch, arch_how=how, warnings=ctx.warnings, notes=ctx.notes,
                      output_metadata=ctx.output_metadata, block_sensitive=resolver.block_sensitive,
                      config=ctx.config, vocab=vocab, adapter=ctx.adapter, statistic=statistic)
    if method.merges_tensors and not any(t.method is method for t in tasks.values()):
        others = [set(plan.tensor_names(i)) for i in spec.inputs[1:]]
        matched = method.plan_tasks is not None or any(_input_names(method, n, others, arch) for n in names)
        if not matched or not merge.warnings:  # a warning already said why, unless no key even matched
            merge.warnings.append(f"{spec.method} changed no tensor: no key of {', '.join(spec.inputs[1:])} "
                                  "matched" if not matched else f"{spec.method} changed no tensor")
    return merge


MARKER_KEYS = ("v_pred", "ztsnr")  # ComfyUI's markers of a v-prediction / zero-terminal-SNR SDXL model


def _keep_markers(plan: Plan, spec: MergeSpec, names: list[str], tasks: dict, ctx) -> None:
    """Keys only in later inputs are left out, as A1111 does, with one warning; markers that say
    how to sample the model are kept from whichever input has them (dropping them silently
    turns a v-prediction model into a broken eps one)."""
    first = set(names)
    dropped: dict[str, list[str]] = {}
    for i, node in enumerate(spec.inputs[1:], start=1):
        others = plan.tensor_names(node)
        same_kind = detect(others)[0].name == ctx.arch.name  # another architecture's markers mean nothing here
        for key in others:
            if key in first or key in tasks or any(k in first for k in _respelled(key, ctx.arch)):
                continue
            if key in MARKER_KEYS and same_kind:
                ref = plan.ref(node, key)
                tasks[key] = TensorTask(key, ref.dtype, ref.shape, ((node, key),), None, state=PASSTHROUGH)
            else:
                dropped.setdefault(node, []).append(key)
    for node, keys in dropped.items():
        shown = ", ".join(repr(k) for k in keys[:2])
        ctx.warn(f"{len(keys)} keys only in {node} are left out, as A1111 does (e.g. {shown})")


def _key_by_key(plan: Plan, spec: MergeSpec, method: Method, names: list[str], resolver) -> dict[str, TensorTask]:
    substring_rule = resolver.arch.rule_applies(names)
    others = [set(plan.tensor_names(i)) for i in spec.inputs[1:]]
    return {name: _task(plan, spec, method, name, substring_rule, resolver, others) for name in sorted(names)}


def _plan_statistic(ctx: MergeContext, method: Method) -> StatisticTask | None:
    """The merge's whole-model statistic, a node of the plan its tasks read (statistics.py)."""
    if method.statistic is None:
        return None
    try:
        stat = plan_statistic(ctx.spec.name, ctx.spec.inputs, method.statistic(ctx))
    except ValueError as e:
        raise MergefileError(ctx.plan.mergefile.path, f"merges.{ctx.spec.name}", None, str(e)) from None
    if stat is not None:
        ctx.plan.statistics[stat.node] = stat
    return stat


def _method_planned(ctx: MergeContext, method: Method) -> dict[str, TensorTask]:
    plan, spec = ctx.plan, ctx.spec
    stat = next((s.node for s in plan.statistics.values() if s.merge == spec.name), None)
    tasks = {}
    try:
        for p in method.plan_tasks(ctx):
            inputs = tuple((stat if i == STATISTIC else spec.inputs[i], name) for i, name in p.inputs)
            if p.params is not None:
                tasks[p.name] = TensorTask(p.name, p.dtype, tuple(p.shape), inputs, method, p.params)
            elif p.dtype == plan.ref(*inputs[0]).dtype:
                tasks[p.name] = TensorTask(p.name, p.dtype, tuple(p.shape), inputs, None, state=PASSTHROUGH)
            else:
                tasks[p.name] = TensorTask(p.name, p.dtype, tuple(p.shape), inputs, get_method("copy"), {})
    except ValueError as e:
        raise MergefileError(plan.mergefile.path, f"merges.{spec.name}", None, str(e)) from None
    return dict(sorted(tasks.items()))


def _input_names(method: Method, name: str, others: list[set], arch: Architecture) -> list[str] | None:
    """The tensor each other input contributes to key `name`, or None if one has none."""
    found = []
    for i, names in enumerate(others, start=1):
        candidates = method.input_names(name, i, arch) if method.input_names else (name,)
        hit = next((c for c in (*candidates, *_respelled(name, arch)) if c in names), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _respelled(name: str, arch: Architecture) -> tuple[str, ...]:
    """The other spellings of a key where its architecture's prefix is optional: a full Flux
    checkpoint's model.diffusion_model.X is X in a transformer-only file, and back."""
    out = []
    for prefix in arch.optional_prefixes:
        out.append(name[len(prefix):] if name.startswith(prefix) else prefix + name)
    return tuple(out)


def _task(plan: Plan, spec: MergeSpec, method: Method, name: str, substring_rule: bool,
          resolver: ParamResolver, others: list[set]) -> TensorTask:
    a = plan.ref(spec.inputs[0], name)
    # a schedule (SD3's sigmas) is never merged nor cast; SD's passthrough keys follow A1111's save_as_half
    kept = resolver.arch.extra.get("passthrough_keeps_dtype") and any(p.search(name) for p in resolver.arch.passthrough)
    out_dtype = USER_DTYPES[spec.dtype] if spec.dtype and is_float(a.dtype) and not kept else a.dtype
    mergeable = (method.merges_tensors and resolver.arch.merges_key(name, substring_rule) and is_float(a.dtype)
                 and resolver.selected(name))
    other_names = _input_names(method, name, others, resolver.arch) if mergeable else None
    refs = [a] + [plan.ref(n, t) for n, t in zip(spec.inputs[1:], other_names or [])]
    mergeable = other_names is not None and all(is_float(r.dtype) for r in refs)
    params = resolver.merge_params(name) if mergeable else None
    mergeable = params is not None
    if spec.fix_clip_position_ids and name.endswith(POSITION_IDS_SUFFIX):
        return TensorTask(name, "I64", a.shape, (), POSITION_IDS, {"shape": list(a.shape)})
    if mergeable:
        channels = _check_shapes(spec, name, refs, resolver.arch.inpainting)
        inputs = ((spec.inputs[0], name),) + tuple(zip(spec.inputs[1:], other_names))
        if method.reads is not None and channels is None and not spec.clip_to_inputs:
            inputs = tuple(inputs[i] for i in method.reads)  # its key depends on these alone
        if method.input_dtypes is not None and method.input_dtypes(params):
            params = {**params, "dtypes": [r.dtype for r in refs]}
        return TensorTask(name, out_dtype, a.shape, inputs, method, params, channels, spec.clip_to_inputs)
    if out_dtype == a.dtype:
        return TensorTask(name, a.dtype, a.shape, ((spec.inputs[0], name),), None, state=PASSTHROUGH)
    cast = get_method("copy")
    return TensorTask(name, out_dtype, a.shape, ((spec.inputs[0], name),), cast, {})


def _check_shapes(spec: MergeSpec, name: str, refs: list[TensorRef], inpainting: dict) -> int | None:
    """None when all shapes agree; the channel count to merge for inpainting-style mismatches
    (the architecture's `inpainting` entry: latent and wider input channels)."""
    latent, wider = inpainting.get("latent_channels"), tuple(inpainting.get("wider_channels", ()))
    a = refs[0].shape
    channels = None
    for other_name, ref in zip(spec.inputs[1:], refs[1:]):
        b = ref.shape
        if b == a:
            continue
        same_but_dim1 = len(a) == len(b) >= 2 and a[:1] + a[2:] == b[:1] + b[2:]
        # A1111's rule: an inpainting (9) or instruct-pix2pix (8) conv_in against a plain one (4)
        if same_but_dim1 and a[1] in wider and b[1] == latent:
            channels = latent
            continue
        detail = f"{spec.inputs[0]} {list(a)} vs {other_name} {list(b)}"
        if same_but_dim1 and b[1] in wider and a[1] == latent:
            raise InputError(
                f"[merges.{spec.name}] key {name!r}: {detail}: the first input must be the "
                "inpainting / instruct-pix2pix model (the one with more input channels)"
            )
        raise InputError(f"[merges.{spec.name}] key {name!r}: shapes differ: {detail}{shape_hint(name, a, b)}")
    return channels


def task_key(plan: Plan, merge: str, task: TensorTask, digests: list[str]) -> str:
    """A tensor's cache key: its merge's method, version and compute dtype (from the recipe
    node), the parameters resolved for this tensor and the digests of the inputs it reads."""
    method = task.method
    node = plan.recipe.nodes[merge]
    own = node["method"] == method.name  # else a helper (a dtype cast, position ids) made it
    doc = [
        method.name,
        node["version"] if own else method.version,
        sorted(task.params.items()),
        USER_DTYPES[node["settings"]["compute_dtype"]],
        task.dtype,
        task.channels,
        task.clip,
        digests,
        task.name if method.takes_key else None,
    ]
    return text_digest(json.dumps(doc, separators=(",", ":"), default=str))


def resolve_keys(plan: Plan, merge: MergePlan, cache: Cache, force: bool = False) -> None:
    """Fill in keys, digests and states of the tasks whose inputs are known."""
    keyed = []
    name = merge.spec.name
    for task in merge.tasks.values():
        if task.method is None:
            task.state = PASSTHROUGH
            task.digest = plan.ref(*task.inputs[0]).digest
            continue
        if task.state == CACHED and task.key is not None:
            continue  # computed earlier in this build
        digests = [plan.ref(*i).digest for i in task.inputs]
        if None in digests:
            task.key, task.digest, task.state = None, None, PENDING
            continue
        task.key = task_key(plan, name, task, digests)
        keyed.append(task)
    found = {} if force else cache.find_results({t.key: (t.dtype, t.shape) for t in keyed})  # local, else remote
    for task in keyed:
        digest = found.get(task.key)
        if digest is not None:
            task.digest, task.state = digest, CACHED
        else:
            task.digest, task.state = None, DIRTY

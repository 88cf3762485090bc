"""The one registry of merge methods.

A method is a pure function `fn(*tensors, **params) -> tensor` plus its declaration: name,
version (bump it when the numbers it produces change: it is part of every cache key), input
names, and parameters. Built-ins are listed in BUILTIN, by module; plugins register through the
"mergebuild.methods" entry-point group with the same Method objects. Duplicate names are refused.

Loading is lazy, so a build imports only the methods it names (a no-op build stays fast): a
built-in name loads its own module; the plugins (importlib.metadata, ~25 ms, and their modules)
load for a name no built-in has, or when every method is asked for (`mergebuild methods`, a
suggestion for an unknown name). A plugin that reuses a built-in's name is refused then.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

REQUIRED = object()
# every built-in method, by the module that declares it (tests/unit/test_registry_index.py
# holds this to each module's METHODS)
BUILTIN = {
    "mergebuild.methods.basic": ("weighted_sum", "add_difference", "copy"),
    "mergebuild.methods.classic": ("sum_twice", "triple_sum", "weighted_subtraction", "tensor_sum", "slerp",
                                   "train_difference", "cosine_a", "cosine_b", "extract"),
    "mergebuild.methods.meh": ("multiply_difference", "similarity_add_difference", "euclidean_add_difference",
                               "top_k_tensor_sum", "distribution_crossover"),
    "mergebuild.methods.task_vectors": ("task_arithmetic", "ties", "dare", "dare_ties", "breadcrumbs", "della",
                                        "model_stock"),
    "mergebuild.methods.many": ("soup", "fisher", "geometric_median", "ema", "tail_average"),
    "mergebuild.methods.parts": ("swap", "attention_swap", "bake_vae"),
    "mergebuild.methods.lora": ("lora",),
    "mergebuild.methods.lora_make": ("lora_merge", "lora_extract"),
    "mergebuild.methods.mergekit_methods": ("nuslerp", "multislerp", "karcher", "sce", "nearswap"),
    "mergebuild.methods.passthrough": ("passthrough",),
    "mergebuild.methods.rebasin": ("rebasin", "permute"),
    "mergebuild.methods.zipit": ("zipit",),
}
BUILTIN_MODULES = tuple(BUILTIN)
_MODULE_OF = {name: module for module, names in BUILTIN.items() for name in names}
ENTRY_POINT_GROUP = "mergebuild.methods"


@dataclass(frozen=True)
class Param:
    """A method parameter. kind: float, int, str, bool, or list (a list of numbers, one per input
    model, e.g. TIES `weights`). Numeric parameters may vary per tensor (block weights): the
    planner resolves them, so a method function always receives plain values."""

    name: str
    kind: type
    default: object = REQUIRED
    doc: str = ""
    choices: tuple = ()
    # list parameters with one value per input model: the length they must have for n inputs
    # (checked when the Mergefile is read; an empty list means "the default for each")
    count: Callable | None = None
    # other values accepted for a str parameter with choices, each as (value, the choice it means):
    # the words that replaced a bool keep old Mergefiles working (DARE's rescale = true)
    aliases: tuple = ()
    # a parameter added after Mergefiles were written: a tensor's parameters (and so its cache
    # key) hold it only where the Mergefile sets it, and the function's own default applies
    # elsewhere, so the keys of files that do not use it stay as they were
    implicit: bool = False
    # a value with a structure of its own (passthrough's slices, a list of tables): check(value)
    # -> None, or (where in the value, what is wrong) for the Mergefile's error; kind is the
    # type of the whole
    check: Callable | None = None
    # strings a numeric parameter also takes, resolved before planning (tail_average's k = "auto",
    # chosen by the two-tailed rule: tune/two_tailed.py); never a per-block value
    words: tuple[str, ...] = ()
    # one value for the whole model (a whole-model statistic's iterations, seed): never a block
    # table, since the statistic is computed once for all keys
    whole_model: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def numeric(self) -> bool:
        return self.kind in (float, int) and not self.whole_model

    def accepts(self, value) -> bool:
        if isinstance(value, str) and value in self.words:
            return True
        if self.check is not None:
            return isinstance(value, self.kind) and self.check(value) is None
        if self.kind is float:
            return _is_number(value)
        if self.kind is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if self.kind is list:
            return isinstance(value, list) and all(_is_number(v) for v in value)
        if any(type(value) is type(alias) and value == alias for alias, _ in self.aliases):
            return True
        if not isinstance(value, self.kind):
            return False
        return not self.choices or value in self.choices

    def describe(self) -> str:
        if self.check is not None:
            return self.doc
        if self.choices:
            words = " | ".join(repr(c) for c in self.choices)
            if self.aliases:
                words += " (" + ", ".join(f"{_toml(a)} = {c!r}" for a, c in self.aliases) + ")"
            return words
        kind = {list: "a list of numbers"}.get(self.kind, self.kind.__name__)
        return kind + "".join(f" or {w!r}" for w in self.words)

    def as_dict(self) -> dict:
        """For `mergebuild methods NAME --json`."""
        names = {} if self.check is not None else {list: "list of numbers"}  # a checked list holds anything
        kind = names.get(self.kind, self.kind.__name__)
        return {"type": kind,
                "default": None if self.required else self.default, "required": self.required,
                "choices": list(self.choices), "varies_by_block": self.numeric, "doc": self.doc,
                **({"aliases": {_toml(a): c for a, c in self.aliases}} if self.aliases else {}),
                **({"words": list(self.words)} if self.words else {})}

    def canonical(self, value):
        """The choice a value means: an alias's choice, else the value itself."""
        return next((c for a, c in self.aliases if type(value) is type(a) and value == a), value)


def _toml(value) -> str:
    """A value as a Mergefile writes it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Method:
    name: str
    version: int
    fn: Callable
    inputs: tuple[str, ...]  # the names of the inputs, in order ("A", "B", "C")
    params: tuple[Param, ...] = ()
    doc: str = ""
    merges_tensors: bool = True  # False: every tensor is taken from the first input (copy)
    takes_key: bool = False  # fn gets key=<tensor name> (for per-tensor random streams)
    elementwise: bool = False  # each output element depends only on the same element of the inputs,
    # bit for bit at any offset: the CPU executor may run it on chunks (no whole-tensor float32
    # copies), and small tensors may share one call (execute/batching.py); tests/methods/
    # test_elementwise.py holds every such method to it

    variadic: bool = False  # takes len(inputs) or more models (soups, TIES over many fine-tunes)
    # select(key, params, arch) -> bool: which keys the method changes (others pass through
    # from the first input); None: every mergeable key (swap and attention_swap select)
    select: Callable | None = None
    # input_names(key, i, arch) -> candidate tensor names in input i (bake_vae: VAE files lack the
    # "first_stage_model." prefix); None: the same key in every input
    input_names: Callable | None = None
    # plan_tasks(context) -> iterable of PlannedTensor: the method plans its output tensors itself
    # (LoRA bake-in reads several tensors per key; lora_merge and lora_extract write LoRA keys).
    # `context` is a plan.planner.MergeContext. None: one task per key of the first input.
    plan_tasks: Callable | None = None
    # the inputs fn reads, by position, when only some: fn then receives those alone, and a
    # tensor's cache key hashes only them (a swap that takes B does not depend on A)
    reads: tuple[int, ...] | None = None
    # input_dtypes(params) -> bool: whether fn also gets dtypes=[each input's stored dtype, as a
    # safetensors code] for a tensor with these params (A1111's arithmetic is done in the files'
    # own dtypes, and fn sees them converted to the compute dtype); they join the params, and so
    # the cache key. None: never
    input_dtypes: Callable | None = None
    # stored_dtype(params) -> bool: fn on float16 (or bfloat16) inputs gives the bits of fn on them
    # in float32, cast back: the CPU executor may skip the float32 chunks (execute/native.py, which
    # also probes it); tests/methods/test_native.py holds every such method to it. None: never
    stored_dtype: Callable | None = None
    # statistic(context) -> PlannedStatistic | None: a whole-model statistic the merge needs (a
    # two-phase merge: re-basin's permutations), computed once per build before its per-tensor
    # tasks and cached; tasks read its tensors as inputs (STATISTIC, name). None: none
    statistic: Callable | None = None
    follows: str = ""  # whose semantics it follows (A1111, supermerger, sd-meh, mergekit...): the module's FOLLOWS
    extra: dict = field(default_factory=dict)

    def arity_ok(self, n: int) -> bool:
        return n >= len(self.inputs) if self.variadic else n == len(self.inputs)

    def arity_text(self) -> str:
        names = ", ".join(self.inputs)
        if self.variadic:
            return f"{len(self.inputs)} or more inputs ({names}, ...)"
        return f"{len(self.inputs)} inputs ({names})"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def defaults(self) -> dict:
        """The defaults the planner fills in (not those of implicit parameters: see Param)."""
        return {p.name: p.default for p in self.params if not p.required and not p.implicit}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor planned by a method's own plan_tasks.

    inputs: (input index, tensor name) pairs, in the order fn receives them as positional tensors.
    params: the keyword parameters fn receives for this tensor (JSON-able: they are part of the
    cache key); None means "the single input tensor, unchanged" (cast to the merge's dtype if set).
    """

    name: str
    dtype: str  # safetensors code, e.g. "F16"
    shape: tuple[int, ...]
    inputs: tuple[tuple[int, str], ...]
    params: dict | None = None


STATISTIC = "statistic"  # a PlannedTensor input (STATISTIC, name): a tensor of the merge's statistic


@dataclass(frozen=True)
class PlannedStatistic:
    """A whole-model statistic a merge needs (docs/architecture.md, two-phase merges).

    compute(reader, **params) -> {name: tensor} runs in the executor, before the merge's tensors,
    only when its key changed; `reader.load(i, tensor_name)` gives input i's tensor (compute
    dtype, CPU), read on demand through a bounded memory budget. The key hashes name, version,
    params, the compute dtype, the digests of every tensor in `reads` and the `data` digests (a
    dataset file's, a script's: anything else it reads). `outputs` declares what compute returns
    ({name: (dtype, shape)}): tasks read them as inputs (STATISTIC, name), one digest each.
    """

    name: str  # e.g. "rebasin.weight_matching"; with version, part of the key
    version: int
    compute: Callable
    reads: tuple[tuple[int, str], ...]  # (input index, tensor name) of every tensor compute may read
    outputs: dict  # name -> (dtype code, shape)
    params: dict = field(default_factory=dict)  # JSON-able; passed to compute as keywords
    data: dict = field(default_factory=dict)  # label -> digest of anything else it reads


_REGISTRY: dict[str, Method] = {}
_loaded_modules: set[str] = set()
_plugins_loaded = False


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def _load_module(module_name: str) -> None:
    """Register one built-in module's methods (once)."""
    if module_name in _loaded_modules:
        return
    _loaded_modules.add(module_name)
    module = importlib.import_module(module_name)
    for method in module.METHODS:
        follows = method.follows or getattr(module, "FOLLOWS", "")
        register(replace(method, follows=follows) if follows != method.follows else method)


def _load() -> None:
    """Every method: the built-ins, then the plugins."""
    global _plugins_loaded
    for module_name in BUILTIN_MODULES:
        _load_module(module_name)
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        for method in ep.load():
            register(method)


def get_method(name: str) -> Method | None:
    if name in _MODULE_OF:
        _load_module(_MODULE_OF[name])
    elif name not in _REGISTRY:
        _load()
    return _REGISTRY.get(name)


def suggest(name: str) -> str:
    import difflib

    _load()
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def all_methods() -> list[Method]:
    _load()
    return sorted(_REGISTRY.values(), key=lambda m: m.name)

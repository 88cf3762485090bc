"""LoRA and LyCORIS: bake into a checkpoint (lora), merge several into one (lora_merge), extract
one from a fine-tune (lora_extract). See ../../docs/lora.md.

Each method plans its own tensors (Method.plan_tasks): a baked key reads the base tensor and the
LoRA tensors of the modules that target it, nothing else, so its cache key changes only when
they or the multiplier reaching it do. The math is in lora_formats; names in layouts.lora_names;
PEFT adapter configs in peft; the planning of lora_merge and lora_extract in lora_make.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from mergebuild.dtypes import is_float
from mergebuild.layouts.blocks import block_values
from mergebuild.methods import lora_formats as lf
from mergebuild.methods import peft
from mergebuild.methods.registry import Method, Param, PlannedTensor

SHOWN = 5  # unmatched names listed in a message


@dataclass
class Module:
    name: str
    fmt: str
    roles: dict[str, str]  # role -> tensor name in the LoRA file
    scale: float | None = None  # its PEFT adapter's (adapter_config.json), in place of alpha / r
    transpose: bool = False  # dW = (up @ down)^T: PEFT embeddings, fan_in_fan_out adapters

    @property
    def embedding(self) -> bool:
        """PEFT's embedding form (lora_embedding_A / _B)."""
        return self.roles.get("lora_up", "").endswith(lf.EMBEDDING_SUFFIXES[0])

    def label(self, shapes: dict) -> str:
        kind = lf.FORMAT_NAMES[self.fmt]
        if self.fmt == "lora" and "lora_mid" in self.roles:
            kind = lf.FORMAT_NAMES["cp"]
        elif self.fmt == "lora" and math.prod(shapes["lora_down"][2:]) > 1:
            kind = lf.FORMAT_NAMES["locon"]
        return kind + ("+DoRA" if "dora_scale" in self.roles else "")


@dataclass
class LoraFile:
    index: int
    node: str
    modules: list[Module] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # tensors no supported format reads
    adapter: peft.AdapterConfig | None = None  # a PEFT adapter's config (the modules' scales)


def read_lora(ctx, i: int) -> LoraFile:
    """Group input i's tensors into modules by name suffix; a PEFT adapter's modules take their
    scales (and fan_in_fan_out) from its adapter_config.json."""
    out = LoraFile(i, ctx.spec.inputs[i])
    doc = ctx.input_adapter(i) if hasattr(ctx, "input_adapter") else None
    if doc is not None:
        try:
            out.adapter = peft.parse_config(doc)
        except ValueError as e:
            raise ValueError(f"{out.node}: {peft.CONFIG_NAME}: {e}") from None
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for name in ctx.names(i):
        split = lf.split_key(name)
        if split is None:
            out.stray.append(name)
        else:
            groups[split[0]][split[1]] = name
    for module, roles in sorted(groups.items()):
        fmt = lf.module_format(roles)
        if fmt is None:
            out.stray.extend(sorted(roles.values()))
        else:
            mod = Module(module, fmt, roles)
            mod.transpose = fmt == "lora" and (mod.embedding or bool(out.adapter and out.adapter.fan_in_fan_out))
            if out.adapter is not None:
                mod.scale = _adapter_scale(ctx, out, mod)
            out.modules.append(mod)
    return out


def _adapter_scale(ctx, lora: LoraFile, mod: Module) -> float:
    """The scale adapter_config.json gives a module; its rank must be the one its tensors have."""
    if mod.fmt != "lora":
        raise ValueError(f"{lora.node}: module {mod.name} is {lf.FORMAT_NAMES[mod.fmt]}, in a PEFT LoRA adapter")
    said, have = lora.adapter.rank(mod.name), ctx.ref(lora.index, mod.roles["lora_down"]).shape[0]
    if said != have:
        raise ValueError(f"{lora.node}: module {mod.name}: {peft.CONFIG_NAME} gives it rank {said} "
                         f"(r / rank_pattern), and its lora_A has {have} rows")
    return lora.adapter.scale(mod.name)


def _shapes(ctx, i: int, mod: Module) -> dict:
    return {role: tuple(ctx.ref(i, name).shape) for role, name in mod.roles.items()}


def _options(ctx) -> dict:
    """The merge's non-numeric parameters (numeric ones are resolved per key)."""
    method_defaults = {"strengths": [], "block_weights": [], "allow_unmatched": False, "mode": "concat"}
    return {**method_defaults, **ctx.spec.params}


def _strengths(values: list, n: int) -> list[float]:
    if not values:
        return [1.0] * n
    if len(values) != n:
        raise ValueError(f"strengths has {len(values)} values for {n} LoRAs")
    return [float(v) for v in values]


def _listed(names: list[str]) -> str:
    more = f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def lbw_table(values: list, arch) -> dict[str, float]:
    """LoRA Block Weight values -> {block: weight}: one value per block of the architecture (or
    a list its list_conversions convert), or one of the short forms of its "lora" object
    (block_weight_forms: LoRA Block Weight's 17 and 12 values), whose left-out blocks get 0."""
    from mergebuild.layouts.lora_names import lora_spec  # the name schemes: read when planning a bake only

    n = len(values)
    if not arch.blocks:
        raise ValueError(f"block_weights needs a model with blocks; {arch.name} models have none")
    forms = {int(k): v for k, v in lora_spec(arch).get("block_weight_forms", {}).items()}
    if n in forms:
        table = dict.fromkeys(arch.blocks, 0.0)
        table.update(zip(forms[n], map(float, values)))
        return table
    try:
        return block_values([float(v) for v in values], arch)
    except ValueError:
        sizes = sorted({*forms, len(arch.blocks), *arch.list_conversions})
        raise ValueError(f"block_weights: {arch.name} takes {', '.join(map(str, sizes))} values, got {n}") from None


def _multiplier(ctx, key: str, group: str, lbw: dict | None) -> float:
    """strength x unet/te x block weight, for one checkpoint key (of a module in `group`)."""
    params = ctx.params(key)
    m = float(params["strength"])
    if group.startswith("unet"):
        m *= float(params["unet"])
    elif group == "te":
        m *= float(params["te"])
    if lbw is not None:
        m *= lbw.get(ctx.resolver.block_of(key), 0.0)
    return m


def _check_fits(ctx, lora: LoraFile, mod: Module, key: str, rows, shape) -> None:
    shapes = _shapes(ctx, lora.index, mod)
    if mod.fmt == "full":
        if shapes["full"] != tuple(shape):
            raise ValueError(f"{lora.node}: {mod.name} {list(shapes['full'])} is a whole tensor for {key} {list(shape)}")
        return
    want = ((rows[1] - rows[0]) if rows else shape[0]) * math.prod(shape[1:])
    if mod.fmt == "lora" and shapes["lora_up"][1] != shapes["lora_down"][0]:
        raise ValueError(f"{lora.node}: module {mod.name}: lora_up {list(shapes['lora_up'])} and "
                         f"lora_down {list(shapes['lora_down'])} have different ranks")
    have = lf.delta_numel(mod.fmt, shapes)
    if have != want:
        where = f"{key} rows {rows[0]}:{rows[1]}" if rows else key
        raise ValueError(f"{lora.node}: module {mod.name} ({mod.label(shapes)}) makes {have} values, "
                         f"{where} {list(shape)} needs {want}")


def _problems(ctx, lora: LoraFile, unmatched: list[str], allow: bool) -> None:
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} LoRA modules match no key of {ctx.spec.inputs[0]} "
                     f"({ctx.arch.name}): {_listed(unmatched)}")
    if lora.stray:
        parts.append(f"{len(lora.stray)} tensors of no supported LoRA format: {_listed(lora.stray)}")
    if not parts:
        return
    text = f"{lora.node}: " + "; ".join(parts)
    if not allow:
        raise ValueError(text + " (allow_unmatched = true skips them)")
    ctx.warn(text + " (skipped)")


def plan_bake(ctx):
    """lora: the model's keys; those LoRA modules target read the base and those modules only."""
    from mergebuild.layouts.lora_names import full_tensor_names, lora_names_map  # planning a bake only

    opts = _options(ctx)
    n = len(ctx.spec.inputs) - 1
    strengths = _strengths(opts["strengths"], n)
    lbw = lbw_table(opts["block_weights"], ctx.arch) if opts["block_weights"] else None
    keys = ctx.names(0)
    shapes = {k: tuple(ctx.ref(0, k).shape) for k in keys}
    names = lora_names_map(shapes, ctx.arch)
    whole = full_tensor_names(shapes, ctx.arch)  # PEFT's modules_to_save: tensors saved whole
    hits: dict[str, list] = defaultdict(list)
    for i in range(1, n + 1):
        lora = read_lora(ctx, i)
        lora.modules += [Module(t, "full", {"full": t}) for t in lora.stray if t in whole]
        lora.stray = [t for t in lora.stray if t not in whole]
        unmatched, kinds = [], Counter()
        for mod in lora.modules:
            found = whole.get(mod.name) if mod.fmt == "full" else names.get(mod.name)
            if found is None:
                unmatched.append(mod.name)
                continue
            target = found.target
            _check_fits(ctx, lora, mod, target.key, target.rows, shapes[target.key])
            hits[target.key].append((i, mod, found))
            kinds[mod.label(_shapes(ctx, i, mod))] += 1
        _problems(ctx, lora, unmatched, bool(opts["allow_unmatched"]))
        applied = sum(kinds.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        ctx.note(f"{lora.node}: applied {applied} LoRA modules" + (f" ({detail})" if detail else ""))
    for key in keys:
        ref = ctx.ref(0, key)
        dtype = ctx.out_dtype(ref.dtype)
        modules, inputs = [], [(0, key)]
        if key in hits and ctx.resolver.selected(key):
            if not is_float(ref.dtype):
                raise ValueError(f"LoRA modules target {key}, which holds {ref.dtype} values")
            for i, mod, found in hits[key]:
                m = _multiplier(ctx, key, found.group, lbw) * strengths[i - 1]
                if m == 0:
                    continue
                slots = {}
                for role, name in sorted(mod.roles.items()):
                    slots[role] = len(inputs) - 1  # position among the tensors after the weight
                    inputs.append((i, name))
                modules.append(_module_task(mod, slots, m, found.target))
        if len(modules) == 1 and modules[0]["format"] == "full" and modules[0]["multiplier"] == 1:
            yield PlannedTensor(key, dtype, ref.shape, (inputs[1],), None)  # the saved tensor, as it is
        elif modules:
            yield PlannedTensor(key, dtype, ref.shape, tuple(inputs), {"modules": modules})
        else:
            yield PlannedTensor(key, dtype, ref.shape, ((0, key),), None)


def _module_task(mod: Module, slots: dict, m: float, target) -> dict:
    """What lora_formats.bake needs of one module (swap only when set: the cache keys of
    modules that do not swap stay as they were)."""
    task = {"format": mod.fmt, "tensors": slots, "multiplier": m, "rows": list(target.rows) if target.rows else None}
    if target.swap:
        task["swap"] = True
    if mod.scale is not None:
        task["scale"] = mod.scale
    if mod.transpose:
        task["transpose"] = True
    return task


STRENGTHS = Param("strengths", list, [], "one multiplier per LoRA, in input order (default: all 1)")
CLAMP = Param("clamp_quantile", float, 1.0, "clamp up and down to this quantile of their |values| (kohya: 0.99; 1: off)")
# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "kohya's sd-scripts and LyCORIS"
METHODS = [
    Method("lora", 1, lf.bake, ("model", "lora"), (
        Param("strength", float, 1.0, "multiplier of every module; may vary by block"),
        STRENGTHS,
        Param("unet", float, 1.0, "extra multiplier of diffusion-model modules (UNet or transformer)"),
        Param("te", float, 1.0, "extra multiplier of text-encoder modules"),
        Param("block_weights", list, [], "LoRA Block Weight: a value per block (SD1/SD2 also 17, SDXL 12; Flux 61)"),
        Param("allow_unmatched", bool, False, "true: LoRA modules that match no key are a warning, not an error"),
    ), "Bake LoRA / LoCon / LoHa / LoKr / DoRA files and PEFT adapter folders into a model: W + sum_i m_i dW_i.",
        variadic=True, plan_tasks=plan_bake),
]

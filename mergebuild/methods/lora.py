"""LoRA and LyCORIS: bake into a checkpoint (lora), merge several into one (lora_merge), extract
one from a fine-tune (lora_extract). See ../../docs/lora.md.

Each method plans its own tensors (Method.plan_tasks): a baked key reads the base tensor and the
LoRA tensors of the modules that target it, nothing else, so its cache key changes only when
they or the multiplier reaching it do. The math is in lora_formats; names in layouts.lora_names.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from mergebuild.dtypes import is_float
from mergebuild.layouts.blocks import block_values
from mergebuild.layouts.lora_names import extraction_targets, lora_names_map, lora_spec
from mergebuild.methods import lora_formats as lf
from mergebuild.methods.registry import Method, Param, PlannedTensor

SHOWN = 5  # unmatched names listed in a message


@dataclass
class Module:
    name: str
    fmt: str
    roles: dict[str, str]  # role -> tensor name in the LoRA file

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


def read_lora(ctx, i: int) -> LoraFile:
    """Group input i's tensors into modules by name suffix."""
    out = LoraFile(i, ctx.spec.inputs[i])
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
            out.modules.append(Module(module, fmt, roles))
    return out


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
    opts = _options(ctx)
    n = len(ctx.spec.inputs) - 1
    strengths = _strengths(opts["strengths"], n)
    lbw = lbw_table(opts["block_weights"], ctx.arch) if opts["block_weights"] else None
    keys = ctx.names(0)
    shapes = {k: tuple(ctx.ref(0, k).shape) for k in keys}
    names = lora_names_map(shapes, ctx.arch)
    hits: dict[str, list] = defaultdict(list)
    for i in range(1, n + 1):
        lora = read_lora(ctx, i)
        unmatched, kinds = [], Counter()
        for mod in lora.modules:
            found = names.get(mod.name)
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
        if modules:
            yield PlannedTensor(key, dtype, ref.shape, tuple(inputs), {"modules": modules})
        else:
            yield PlannedTensor(key, dtype, ref.shape, ((0, key),), None)


def _module_task(mod: Module, slots: dict, m: float, target) -> dict:
    """What lora_formats.bake needs of one module (swap only when set: the cache keys of
    modules that do not swap stay as they were)."""
    task = {"format": mod.fmt, "tensors": slots, "multiplier": m, "rows": list(target.rows) if target.rows else None}
    if target.swap:
        task["swap"] = True
    return task


# making LoRA files ----------------------------------------------------------------------------

def _factor_names(module: str) -> tuple[str, str, str | None]:
    """(up, down, alpha) tensor names: kohya's, or PEFT's for dotted module names (no alpha:
    scale 1, as mergebuild reads a missing alpha)."""
    if "." in module:
        return f"{module}.lora_B.weight", f"{module}.lora_A.weight", None
    return f"{module}.lora_up.weight", f"{module}.lora_down.weight", f"{module}.alpha"


def _factor_tasks(module: str, dtype: str, up_shape, down_shape, rank: int, inputs_up, inputs_down,
                  params_up: dict, params_down: dict):
    up, down, alpha = _factor_names(module)
    yield PlannedTensor(up, dtype, tuple(up_shape), tuple(inputs_up), params_up)
    yield PlannedTensor(down, dtype, tuple(down_shape), tuple(inputs_down), params_down)
    if alpha is not None:
        yield PlannedTensor(alpha, dtype, (), (), {"op": "alpha", "value": rank})


def _lora_metadata(ctx, ranks: set, conv_rank: int | None) -> None:
    dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
    ctx.output_metadata.update(ss_network_module="networks.lora", ss_network_dim=dim, ss_network_alpha=dim)
    if conv_rank:
        ctx.output_metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})


def _merge_inputs(ctx, items, roles: tuple[str, ...]):
    """Inputs and module descriptions for merge tasks that read `roles` of each LoRA's module."""
    inputs, modules = [], []
    for i, mod, strength in items:
        slots = {}
        for role in roles:
            if role in mod.roles:
                slots[role] = len(inputs)
                inputs.append((i, mod.roles[role]))
        rank = ctx.ref(i, mod.roles["lora_down"]).shape[0]
        modules.append({"tensors": slots, "multiplier": strength, "rank": rank})
    return inputs, modules


def plan_merge(ctx):
    """lora_merge: one module per module name of the inputs, LoRA / LoCon modules only."""
    opts = _options(ctx)
    strengths = _strengths(opts["strengths"], len(ctx.spec.inputs))
    mode = opts["mode"]
    by_name: dict[str, list] = defaultdict(list)
    for i in range(len(ctx.spec.inputs)):
        lora = read_lora(ctx, i)
        if lora.stray:
            raise ValueError(f"{lora.node}: {len(lora.stray)} tensors of no supported LoRA format: {_listed(lora.stray)}")
        for mod in lora.modules:
            if mod.fmt != "lora" or "dora_scale" in mod.roles:
                raise ValueError(f"{lora.node}: module {mod.name} is {mod.label(_shapes(ctx, i, mod))}: lora_merge "
                                 "merges LoRA and LoCon modules; bake LyCORIS and DoRA into a checkpoint with 'lora'")
            if strengths[i] != 0:
                by_name[mod.name].append((i, mod, strengths[i]))
        ctx.note(f"{lora.node}: {len(lora.modules)} LoRA modules")
    ranks, conv = set(), 0
    for name, items in sorted(by_name.items()):
        i0, mod0, _ = items[0]
        s0 = _shapes(ctx, i0, mod0)
        out, inn = s0["lora_up"][0], s0["lora_down"][1]
        kernel = s0["lora_mid"][2:] if "lora_mid" in s0 else s0["lora_down"][2:]
        is_conv = len(s0["lora_down"]) == 4
        for i, mod, _ in items[1:]:
            s = _shapes(ctx, i, mod)
            if lf.delta_numel("lora", s) != out * inn * math.prod(kernel):
                raise ValueError(f"module {name}: {ctx.spec.inputs[i]} and {ctx.spec.inputs[i0]} disagree on its shape")
        dtype = ctx.out_dtype(ctx.ref(i0, mod0.roles["lora_up"]).dtype)
        params = ctx.params(name)
        if mode == "concat":
            rank = sum(ctx.ref(i, m.roles["lora_down"]).shape[0] for i, m, _ in items)
        else:
            want = params["conv_rank"] if math.prod(kernel) > 1 and params["conv_rank"] >= 0 else params["rank"]
            if want <= 0:
                raise ValueError("mode = 'svd' needs rank (and conv_rank for k x k convolutions) > 0")
            rank = min(want, out, inn * math.prod(kernel))
            conv = max(conv, rank if math.prod(kernel) > 1 else 0)
        ranks.add(rank)
        up_shape = (out, rank, 1, 1) if is_conv else (out, rank)
        down_shape = (rank, inn, *kernel) if is_conv else (rank, inn)
        if mode == "concat":
            in_up, mods_up = _merge_inputs(ctx, items, ("lora_up", "alpha", "scale"))
            in_down, mods_down = _merge_inputs(ctx, items, ("lora_down", "lora_mid"))
            p_up = {"op": "concat_up", "modules": mods_up, "shape": list(up_shape)}
            p_down = {"op": "concat_down", "modules": [{"tensors": m["tensors"]} for m in mods_down],
                      "shape": list(down_shape)}
        else:
            in_up, mods = _merge_inputs(ctx, items, ("lora_up", "lora_down", "lora_mid", "alpha", "scale"))
            in_down = in_up
            common = {"modules": mods, "rank": rank, "clamp_quantile": float(params["clamp_quantile"])}
            p_up = {"op": "svd_up", "shape": list(up_shape), **common}
            p_down = {"op": "svd_down", "shape": list(down_shape), **common}
        yield from _factor_tasks(name, dtype, up_shape, down_shape, rank, in_up, in_down, p_up, p_down)
    _lora_metadata(ctx, ranks, conv if mode == "svd" else None)


def merge_fn(*tensors, op: str, **params):
    """The tensors of lora_merge: concatenated or SVD factors, or a module's alpha."""
    if op == "concat_up":
        return lf.concat_up(*tensors, **params)
    if op == "concat_down":
        return lf.concat_down(*tensors, **params)
    if op in ("svd_up", "svd_down"):
        return lf.svd_part(*tensors, part=op[4:], **params)
    return lf.constant(**params)


def plan_extract(ctx):
    """lora_extract: a module per changed LoRA-able layer, truncated SVD of tuned - base."""
    params0 = _options(ctx)
    tuned, base = ctx.names(0), set(ctx.names(1))
    shapes = {k: tuple(ctx.ref(0, k).shape) for k in tuned}
    conv_default = params0.get("conv_rank", -1)
    targets = extraction_targets(shapes, ctx.arch, conv=conv_default != 0)
    done, unchanged, missing, ranks, conv = 0, 0, 0, set(), 0
    for m in targets:
        key, rows = m.target.key, m.target.rows
        if key not in base or tuple(ctx.ref(1, key).shape) != shapes[key]:
            missing += 1
            continue
        a, b = ctx.ref(0, key), ctx.ref(1, key)
        if not ctx.resolver.selected(key) or (a.digest is not None and a.digest == b.digest):
            unchanged += 1
            continue
        params = ctx.params(key)
        shape = shapes[key]
        out = rows[1] - rows[0] if rows else shape[0]
        kernel = shape[2:]
        kxk = math.prod(kernel) > 1
        want = params["conv_rank"] if kxk and params["conv_rank"] > 0 else params["rank"]
        if want <= 0:
            raise ValueError("rank must be > 0")
        rank = min(want, out, shape[1] * math.prod(kernel))
        ranks.add(rank)
        conv = max(conv, rank if kxk else 0)
        up_shape = (out, rank, 1, 1) if kernel else (out, rank)
        down_shape = (rank, shape[1], *kernel)
        common = {"rank": rank, "rows": list(rows) if rows else None,
                  "clamp_quantile": float(params["clamp_quantile"])} | ({"swap": True} if m.target.swap else {})
        inputs = ((0, key), (1, key))
        dtype = ctx.out_dtype(a.dtype)
        yield from _factor_tasks(m.name, dtype, up_shape, down_shape, rank, inputs, inputs,
                                 {"op": "up", "shape": list(up_shape), **common},
                                 {"op": "down", "shape": list(down_shape), **common})
        done += 1
    note = f"extracted {done} LoRA modules"
    if unchanged:
        note += f"; {unchanged} identical (or excluded) layers skipped"
    if missing:
        note += f"; {missing} layers missing from {ctx.spec.inputs[1]} or shaped differently"
    ctx.note(note)
    _lora_metadata(ctx, ranks or {0}, conv or None)


def extract_fn(*tensors, op: str, **params):
    """The tensors of lora_extract: a factor of the truncated SVD of tuned - base, or an alpha."""
    if op in ("up", "down"):
        return lf.extract_part(*tensors, part=op, **params)
    return lf.constant(**params)


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
    ), "Bake LoRA / LoCon / LoHa / LoKr / DoRA files into a model: W + sum_i m_i dW_i.",
        variadic=True, plan_tasks=plan_bake),
    Method("lora_merge", 1, merge_fn, ("lora",), (
        STRENGTHS,
        Param("mode", str, "concat", "concat: exact, ranks add up; svd: truncated SVD to rank", ("concat", "svd")),
        Param("rank", int, 0, "svd: the rank of the result"),
        Param("conv_rank", int, -1, "svd: the rank of k x k convolutions (-1: rank)"),
        CLAMP,
    ), "Merge LoRA / LoCon files into one LoRA file: sum_i strength_i dW_i.",
        variadic=True, plan_tasks=plan_merge),
    Method("lora_extract", 1, extract_fn, ("tuned", "base"), (
        Param("rank", int, 16, "the rank of linear and 1x1 modules"),
        Param("conv_rank", int, -1, "the rank of k x k convolutions (-1: rank; 0: no ResBlock modules)"),
        CLAMP,
    ), "Extract a LoRA from a fine-tune: truncated SVD of tuned - base per layer.", plan_tasks=plan_extract),
]

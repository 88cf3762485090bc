"""Making LoRAs: lora_merge (several into one) and lora_extract (one from a fine-tune), written
as a kohya file or a PEFT adapter folder. See ../../docs/lora.md.

Every up, down and alpha tensor is its own cached task; the math is in lora_formats.

format (both methods):
    auto   kohya names (<module>.lora_up / lora_down / alpha) for kohya modules, PEFT tensor
           names (lora_B / lora_A, the scale folded into the factors) for PEFT modules; a
           folder output is a PEFT adapter (format "peft")
    kohya  <module>.lora_up.weight, .lora_down.weight, .alpha: one .safetensors file
    peft   <module>.lora_B.weight, .lora_A.weight (embeddings: .lora_embedding_B / _A) in
           adapter_model.safetensors, r and lora_alpha (rank_pattern / alpha_pattern where
           modules differ) in adapter_config.json (methods/peft.py); a folder output, or none
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

from mergebuild.dtypes import is_float
from mergebuild.layouts.lora_names import extraction_targets, full_tensor_name
from mergebuild.mergefile.model import FILE_SUFFIX
from mergebuild.methods import lora_formats as lf
from mergebuild.methods import peft
from mergebuild.methods.lora import CLAMP, STRENGTHS, _listed, _options, _shapes, _strengths, read_lora
from mergebuild.methods.registry import Method, Param, PlannedTensor

FORMATS = ("auto", "kohya", "peft")
MODES = ("concat", "svd", "ties", "dare_ties", "dare")
# the delta modes: task_vectors.generalized_task_arithmetic over the modules' s_i dW_i (a zero
# base), with the defaults of mergebuild's ties, dare_ties and dare methods
DELTA_MODES = {
    "ties": {"sparsify": "magnitude", "sign": "mass", "density": 0.2, "normalize": True},
    "dare_ties": {"sparsify": "random", "sign": "mass", "density": 0.5, "normalize": False},
    "dare": {"sparsify": "random", "sign": "none", "density": 0.5, "normalize": False},
}


@dataclass
class Output:
    """How a LoRA being made is written: its format, and what its adapter config will say."""

    fmt: str  # "auto", "kohya" or "peft"
    modules: dict[str, tuple[int, float]] = field(default_factory=dict)  # name -> (rank, alpha)
    whole: list[str] = field(default_factory=list)  # modules_to_save: last names of the modules saved whole

    def names(self, module: str, embedding: bool = False) -> tuple[str, str, str | None]:
        """(up, down, alpha) tensor names: PEFT's (no alpha: it is in the config, or the scale is
        folded in) or kohya's."""
        if self.fmt == "peft" or (self.fmt == "auto" and "." in module):
            if embedding:
                return f"{module}{lf.EMBEDDING_SUFFIXES[0]}", f"{module}{lf.EMBEDDING_SUFFIXES[1]}", None
            return f"{module}.lora_B.weight", f"{module}.lora_A.weight", None
        if embedding:
            raise ValueError(f"module {module} is a PEFT embedding LoRA, which has no kohya form: "
                             "write a PEFT adapter (format = 'peft') or keep the PEFT names (format = 'auto')")
        return f"{module}.lora_up.weight", f"{module}.lora_down.weight", f"{module}.alpha"

    def factors(self, module: str, dtype: str, up_shape, down_shape, rank: int, inputs_up, inputs_down,
                params_up: dict, params_down: dict, alpha: float | None = None, embedding: bool = False):
        """The module's up, down (and alpha) tasks; alpha None: alpha = rank (scale 1)."""
        up, down, alpha_name = self.names(module, embedding)
        yield PlannedTensor(up, dtype, tuple(up_shape), tuple(inputs_up), params_up)
        yield PlannedTensor(down, dtype, tuple(down_shape), tuple(inputs_down), params_down)
        if alpha_name is not None:
            yield PlannedTensor(alpha_name, dtype, (), (), {"op": "alpha", "value": rank if alpha is None else alpha})
        elif alpha is not None and self.fmt != "peft":
            raise ValueError(f"alpha: module {module} is written under PEFT names, which hold no alpha outside an "
                             "adapter folder; write a PEFT adapter folder (format = 'peft') or a kohya file "
                             "(format = 'kohya')")
        self.modules[module] = (rank, rank if alpha is None else alpha)

    def finish(self, ctx, ranks: set, conv_rank: int | None, **config) -> None:
        """kohya's ss_network_* metadata, and for a PEFT adapter its adapter_config.json."""
        dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        alphas = {a for _, a in self.modules.values()}
        alpha = str(peft.plain(next(iter(alphas)))) if len(alphas) == 1 and self.modules else dim
        ctx.output_metadata.update(ss_network_module="networks.lora", ss_network_dim=dim, ss_network_alpha=alpha)
        if conv_rank:
            ctx.output_metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank),
                                                                 "conv_alpha": str(conv_rank)})
        if self.fmt == "peft":
            ctx.adapter = peft.make_config(self.modules, modules_to_save=sorted(set(self.whole)), **config)


def output_format(ctx, modules) -> Output:
    """The format the merge writes, checked against its output path and its modules' names."""
    fmt = ctx.spec.params.get("format", "auto")
    out = ctx.spec.output
    folder = out is not None and out.suffix.lower() != FILE_SUFFIX
    if fmt == "auto" and folder:
        fmt = "peft"
    elif fmt == "peft" and out is not None and not folder:
        raise ValueError(f"format = 'peft' writes a PEFT adapter folder, and {out.name} names a file: "
                         "name the output without .safetensors")
    elif fmt == "kohya" and folder:
        raise ValueError("format = 'kohya' writes one .safetensors file: name the output NAME.safetensors")
    if fmt == "peft":
        other = [m for m in modules if not m.startswith(peft.MODULE_PREFIX)]
        if other:
            raise ValueError(f"a PEFT adapter holds modules named {peft.MODULE_PREFIX}<module>, and {len(other)} are "
                             f"named otherwise ({_listed(other)}); write a .safetensors file instead")
    return Output(fmt)


# lora_merge -----------------------------------------------------------------------------------

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
        modules.append({"tensors": slots, "multiplier": strength, "rank": rank}
                       | ({"scale": mod.scale} if mod.scale is not None else {}))
    return inputs, modules


def _adapters_agree(loras: list) -> dict:
    """What the inputs' adapter configs say of the merged adapter: base model, task type and
    fan_in_fan_out, where every input says the same (fan_in_fan_out must agree)."""
    adapters = [lora.adapter for lora in loras]
    flips = {bool(a and a.fan_in_fan_out) for a in adapters}
    if len(flips) > 1:
        raise ValueError("the inputs disagree on fan_in_fan_out (PEFT stores those modules transposed); merge "
                         "adapters of one kind")

    def same(attr: str):
        said = {getattr(a, attr) if a is not None else None for a in adapters}
        return next(iter(said)) if len(said) == 1 else None

    return {"base_model": same("base_model"), "task_type": same("task_type"), "fan_in_fan_out": flips == {True}}


def plan_merge(ctx):
    """lora_merge: one module per module name of the inputs, LoRA / LoCon modules only."""
    opts = _options(ctx)
    strengths = _strengths(opts["strengths"], len(ctx.spec.inputs))
    mode = opts["mode"]
    by_name: dict[str, list] = defaultdict(list)
    loras = [read_lora(ctx, i) for i in range(len(ctx.spec.inputs))]
    for i, lora in enumerate(loras):
        if lora.stray:
            whole = " (tensors saved whole, PEFT's modules_to_save: bake the adapter with 'lora')" \
                if lora.adapter is not None else ""
            raise ValueError(f"{lora.node}: {len(lora.stray)} tensors of no supported LoRA format{whole}: "
                             f"{_listed(lora.stray)}")
        for mod in lora.modules:
            if mod.fmt != "lora" or "dora_scale" in mod.roles:
                raise ValueError(f"{lora.node}: module {mod.name} is {mod.label(_shapes(ctx, i, mod))}: lora_merge "
                                 "merges LoRA and LoCon modules; bake LyCORIS and DoRA into a checkpoint with 'lora'")
            if strengths[i] != 0:
                by_name[mod.name].append((i, mod, strengths[i]))
        ctx.note(f"{lora.node}: {len(lora.modules)} LoRA modules")
    agreed = _adapters_agree(loras)
    output = output_format(ctx, list(by_name))
    if agreed["fan_in_fan_out"] and output.fmt != "peft":
        raise ValueError("fan_in_fan_out adapters merge into a PEFT adapter only (format = 'peft', a folder output): "
                         "their factors are stored transposed")
    ranks, conv = set(), 0
    for name, items in sorted(by_name.items()):
        rank, kxk = yield from _merge_module(ctx, output, mode, name, items)
        ranks.add(rank)
        conv = max(conv, rank if kxk and mode != "concat" else 0)
    output.finish(ctx, ranks, conv or None, **agreed)


def _merge_module(ctx, output: Output, mode: str, name: str, items: list):
    """The tasks of one merged module; returns (its rank, whether it is a k x k convolution)."""
    i0, mod0, _ = items[0]
    s0 = _shapes(ctx, i0, mod0)
    out, inn = s0["lora_up"][0], s0["lora_down"][1]
    kernel = s0["lora_mid"][2:] if "lora_mid" in s0 else s0["lora_down"][2:]
    is_conv = len(s0["lora_down"]) == 4
    for i, mod, _ in items[1:]:
        if lf.delta_numel("lora", _shapes(ctx, i, mod)) != out * inn * math.prod(kernel) or mod.embedding != mod0.embedding:
            raise ValueError(f"module {name}: {ctx.spec.inputs[i]} and {ctx.spec.inputs[i0]} disagree on its shape")
    dtype = ctx.out_dtype(ctx.ref(i0, mod0.roles["lora_up"]).dtype)
    params = ctx.params(name)
    kxk = math.prod(kernel) > 1
    if mode == "concat":
        rank = sum(ctx.ref(i, m.roles["lora_down"]).shape[0] for i, m, _ in items)
    else:
        want = params["conv_rank"] if kxk and params["conv_rank"] >= 0 else params["rank"]
        if want <= 0:
            raise ValueError(f"mode = {mode!r} needs rank (and conv_rank for k x k convolutions) > 0")
        rank = min(want, out, inn * math.prod(kernel))
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
        op = "svd"
        if mode in DELTA_MODES:
            op, common["merge"] = "delta", _delta_merge(mode, params, name)
        p_up = {"op": f"{op}_up", "shape": list(up_shape), **common}
        p_down = {"op": f"{op}_down", "shape": list(down_shape), **common}
    yield from output.factors(name, dtype, up_shape, down_shape, rank, in_up, in_down, p_up, p_down,
                              embedding=mod0.embedding)
    return rank, kxk


def _delta_merge(mode: str, params: dict, name: str) -> dict:
    """generalized_task_arithmetic's arguments for a delta mode (the mode's defaults where the
    Mergefile sets nothing); DARE's random stream is the module's (its up and down tasks draw
    the same mask)."""
    merge = dict(DELTA_MODES[mode])
    for field_name in ("density", "normalize"):
        if params.get(field_name) is not None:
            merge[field_name] = params[field_name]
    merge["lam"] = float(params.get("lambda", 1.0))
    merge["density"] = float(merge["density"])
    if merge["sparsify"] == "random":
        merge.update(seed=int(params.get("seed", 0)), key=name)
    return merge


def merge_fn(*tensors, op: str, **params):
    """The tensors of lora_merge: concatenated, SVD or TIES / DARE factors, or a module's alpha."""
    if op == "concat_up":
        return lf.concat_up(*tensors, **params)
    if op == "concat_down":
        return lf.concat_down(*tensors, **params)
    if op in ("svd_up", "svd_down"):
        return lf.svd_part(*tensors, part=op[4:], **params)
    if op in ("delta_up", "delta_down"):
        return lf.delta_merge_part(*tensors, part=op[6:], **params)
    return lf.constant(**params)


# lora_extract ---------------------------------------------------------------------------------

def _adaptive_rank(ctx, key: str, rows, swap: bool, cap: int, params: dict) -> int:
    """energy / sv_epsilon: the rank from the layer's singular values (at most cap)."""
    from_energy, epsilon = params.get("energy"), params.get("sv_epsilon")
    if from_energy is None and epsilon is None:
        return cap
    if from_energy is not None and not 0 < from_energy <= 1:
        raise ValueError(f"energy is {from_energy}: a fraction of the singular values' energy, 0 < energy <= 1")
    total, values = ctx.singular_values(key, rows, swap, cap)
    rank = cap
    if from_energy is not None:
        rank = min(rank, lf.energy_rank(total, values, from_energy))
    if epsilon is not None:
        rank = min(rank, lf.epsilon_rank(values, epsilon))
    return rank


def _extraction_config(ctx) -> dict:
    """The base model and task type an extracted adapter names: the base folder's config.json
    _name_or_path (else the folder), CAUSAL_LM for a *ForCausalLM fine-tune."""
    base = ctx.input_config(1) or {}
    name = base.get("_name_or_path") if isinstance(base.get("_name_or_path"), str) else None
    node = ctx.spec.inputs[1]
    source = ctx.plan.sources.get(node)
    if not name and source is not None and source.path.is_dir():
        name = str(source.path)
    tuned = ctx.input_config(0) or {}
    causal = any(isinstance(a, str) and a.endswith("ForCausalLM") for a in tuned.get("architectures") or ())
    return {"base_model": name or None, "task_type": "CAUSAL_LM" if causal else None}


def plan_extract(ctx):
    """lora_extract: a module per changed LoRA-able layer, truncated SVD of tuned - base; with
    save_full, every other changed tensor whole (mergekit's modules_to_save)."""
    params0 = _options(ctx)
    tuned, base = ctx.names(0), set(ctx.names(1))
    shapes = {k: tuple(ctx.ref(0, k).shape) for k in tuned}
    conv_default = params0.get("conv_rank", -1)
    targets = extraction_targets(shapes, ctx.arch, conv=conv_default != 0)
    output = output_format(ctx, [m.name for m in targets])
    done, unchanged, missing, low, ranks, conv = 0, 0, 0, 0, set(), 0
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
        rank = _adaptive_rank(ctx, key, rows, m.target.swap, min(want, out, shape[1] * math.prod(kernel)), params)
        if rank == 0:
            low += 1
            continue
        ranks.add(rank)
        conv = max(conv, rank if kxk else 0)
        up_shape = (out, rank, 1, 1) if kernel else (out, rank)
        down_shape = (rank, shape[1], *kernel)
        alpha = params.get("alpha")
        common = {"rank": rank, "rows": list(rows) if rows else None,
                  "clamp_quantile": float(params["clamp_quantile"])} | ({"swap": True} if m.target.swap else {}) \
            | ({"alpha": float(alpha)} if alpha is not None else {})
        inputs = ((0, key), (1, key))
        yield from output.factors(m.name, ctx.out_dtype(a.dtype), up_shape, down_shape, rank, inputs, inputs,
                                  {"op": "up", "shape": list(up_shape), **common},
                                  {"op": "down", "shape": list(down_shape), **common},
                                  alpha=float(alpha) if alpha is not None else None)
        done += 1
    whole = 0
    if params0.get("save_full"):
        whole = yield from _whole_tensors(ctx, output, shapes, {m.target.key for m in targets}, base)
    note = f"extracted {done} LoRA modules" + (f", saved {whole} tensors whole" if whole else "")
    if unchanged:
        note += f"; {unchanged} identical (or excluded) layers skipped"
    if low:
        note += f"; {low} layers with no singular value above sv_epsilon skipped"
    if missing:
        note += f"; {missing} layers missing from {ctx.spec.inputs[1]} or shaped differently"
    ctx.note(note)
    output.finish(ctx, ranks or {0}, conv or None, **(_extraction_config(ctx) if output.fmt == "peft" else {}))


def _whole_tensors(ctx, output: Output, shapes: dict, extracted: set, base: set):
    """save_full: the floating tensors of the fine-tune outside the extracted layers that its base
    lacks or differs in, whole, under base_model.model.<key>, with every other tensor of each
    module PEFT's modules_to_save will take for one (it takes every module whose path ends with
    a saved module's last name, and fails to load one not in the file); the count."""
    lora_modules = {k.removesuffix(".weight") for k in extracted}
    changed, skipped = set(), []
    for key, shape in shapes.items():
        ref = ctx.ref(0, key)
        if key in extracted or not ctx.resolver.selected(key) or not is_float(ref.dtype):
            continue
        if key in base and tuple(ctx.ref(1, key).shape) == shape and ref.digest is not None \
                and ref.digest == ctx.ref(1, key).digest:
            continue
        if key.rpartition(".")[0] in lora_modules:  # a LoRA module's bias: PEFT holds it only as lora_B.bias
            skipped.append(key)
        else:
            changed.add(key)
    leaves = {k.rpartition(".")[0].rpartition(".")[2] or k.rpartition(".")[0] for k in changed}
    paths = {".".join(k.split(".")[:n]) for k in shapes for n in range(1, k.count(".") + 1)}
    wrapped = {m for m in paths if any(m.endswith(leaf) for leaf in leaves)}
    for m in sorted(wrapped):
        inside = next((x for x in lora_modules if x == m or x.startswith(m + ".")), None)
        if inside is not None:
            raise ValueError(f"save_full: PEFT would take {m} for a module to save (its name ends like "
                             f"{next(leaf for leaf in leaves if m.endswith(leaf))!r}), and it holds LoRA module "
                             f"{inside}; exclude the keys that changed there")
    chosen = sorted(k for k in shapes if k in changed or any(k.startswith(m + ".") for m in wrapped))
    for key in chosen:
        name = full_tensor_name(key, ctx.arch)
        if name is None:
            raise ValueError(f"save_full writes tensors under PEFT names, which {ctx.arch.name} LoRAs do not use")
        ref = ctx.ref(0, key)
        yield PlannedTensor(name, ctx.out_dtype(ref.dtype), shapes[key], ((0, key),), None)
    output.whole.extend(sorted(leaves))
    if skipped:
        ctx.warn(f"save_full: {len(skipped)} biases of extracted modules are not saved (a PEFT adapter holds them "
                 f"only as lora_B.bias, which mergebuild does not write): {_listed(sorted(skipped))}")
    return len(chosen)


def extract_fn(*tensors, op: str, **params):
    """The tensors of lora_extract: a factor of the truncated SVD of tuned - base, or an alpha."""
    if op in ("up", "down"):
        return lf.extract_part(*tensors, part=op, **params)
    return lf.constant(**params)


FORMAT = Param("format", str, "auto", "auto: kohya or PEFT tensor names as the modules have them, a PEFT adapter for "
               "a folder output; kohya: one kohya .safetensors file; peft: a PEFT adapter folder (adapter_config.json, "
               "adapter_model.safetensors)", FORMATS)
FOLLOWS = "kohya's sd-scripts, PEFT and mergekit-extract-lora"
METHODS = [
    Method("lora_merge", 1, merge_fn, ("lora",), (
        STRENGTHS,
        Param("mode", str, "concat", "concat: exact, ranks add up; svd: truncated SVD to rank; ties, dare_ties, "
              "dare: that merge of the modules' deltas, then truncated SVD to rank", MODES),
        Param("rank", int, 0, "svd, ties, dare_ties, dare: the rank of the result"),
        Param("conv_rank", int, -1, "svd, ties, dare*: the rank of k x k convolutions (-1: rank)"),
        CLAMP,
        Param("density", float, None, "ties, dare*: fraction of each delta kept (ties 0.2, dare* 0.5 when not set)",
              implicit=True),
        Param("normalize", bool, None, "ties, dare*: divide by the summed strengths of the deltas kept "
              "(ties true, dare* false when not set)", implicit=True),
        Param("lambda", float, 1.0, "ties, dare*: multiplier of the merged delta", implicit=True),
        Param("seed", int, 0, "dare*: seed of the drop masks (with the module's name)", implicit=True),
        FORMAT,
    ), "Merge LoRA / LoCon files and PEFT adapters into one LoRA: sum_i strength_i dW_i, or TIES / DARE over them.",
        variadic=True, plan_tasks=plan_merge),
    Method("lora_extract", 1, extract_fn, ("tuned", "base"), (
        Param("rank", int, 16, "the rank of linear and 1x1 modules (with energy or sv_epsilon: the largest)"),
        Param("conv_rank", int, -1, "the rank of k x k convolutions (-1: rank; 0: no ResBlock modules)"),
        CLAMP,
        Param("alpha", float, None, "the alpha stored (kohya .alpha, PEFT lora_alpha); the factors are scaled so "
              "that alpha / r * up @ down is the same (default: alpha = r)", implicit=True),
        Param("energy", float, None, "adaptive rank: the smallest whose singular values hold this fraction of "
              "sum s^2 (at most rank)", implicit=True),
        Param("sv_epsilon", float, None, "adaptive rank (mergekit's --sv-epsilon): keep the singular values above "
              "this (at most rank)", implicit=True),
        Param("save_full", bool, False, "also save every other changed tensor whole (norms, embeddings, lm_head: "
              "mergekit's modules_to_save)", implicit=True),
        FORMAT,
    ), "Extract a LoRA from a fine-tune: truncated SVD of tuned - base per layer.", plan_tasks=plan_extract),
]

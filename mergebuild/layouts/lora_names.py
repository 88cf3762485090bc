"""LoRA module names of a checkpoint's keys: a forward map, never a parse of '_'-joined names.

Every weight key of the checkpoint is converted to each module name a LoRA file may use for it
(kohya names with Diffusers or the checkpoint's own paths, Diffusers-PEFT names, PEFT names,
...); a LoRA module is then looked up by name. '_' is ambiguous in kohya names ("to_q",
"proj_in", "layers_0"), so a name is never split back into a path.

A module's target is a checkpoint key plus an optional row slice: OpenCLIP text encoders fuse
q, k and v in one `attn.in_proj_weight` [3d, d], whose q, k and v modules are its rows [0, d),
[d, 2d) and [2d, 3d) (PyTorch MultiheadAttention order); diffusion transformers fuse q, k, v
(and an MLP) in one weight, which diffusers splits (lora_dit).

What differs between architectures is the "lora" object of their files (archs/*.json; see
docs/architecture.md, "LoRA name schemes"): a scheme ("ldm", "dit" or "peft", each with its
code here or in lora_ldm / lora_dit), the key prefixes, the name forms (a prefix, then the
module path with '.' or '_' between its parts), the text encoders, which form mergebuild writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Mapping

from mergebuild.layouts.blocks import Architecture, architectures
from mergebuild.layouts.lora_dit import DitModule, compile_module, dit_paths
from mergebuild.layouts.lora_ldm import ldm_paths

# OpenCLIP residual block children -> Hugging Face CLIP encoder layer children
OPENCLIP_RENAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
T5_MODULE = re.compile(r"^encoder\.block\.\d+\.layer\.\d+\.(?:SelfAttention\.[qkvo]|DenseReluDense\.w[io](?:_\d)?)$")


@dataclass(frozen=True)
class Target:
    """Where a LoRA module applies: a checkpoint key, rows [start, stop) of it (or all), and
    whether the module sees those rows with their two halves swapped (lora_dit)."""

    key: str
    rows: tuple[int, int] | None = None
    swap: bool = False


@dataclass(frozen=True)
class ModuleName:
    name: str
    target: Target
    # "unet" (attention blocks), "unet_conv" (ResBlocks, samplers: LoCon), "unet_top" (conv_in,
    # conv_out, embeddings), "unet_other" (named, never extracted), "te" (text encoders),
    # "linear" (models of the peft scheme)
    group: str
    preferred: bool  # the name mergebuild writes
    style: str = "kohya"  # whose naming: kohya, diffusers, lycoris, onetrainer, comfyui, peft, ...


@dataclass(frozen=True)
class NameForm:
    """A way to spell a module path: prefix + the path with '.' replaced by sep."""

    prefix: str
    sep: str
    style: str
    write: bool = False
    path: str = "native"  # which path it spells: "native" (the checkpoint's) or "diffusers"

    def spell(self, path: str) -> str:
        return self.prefix + path.replace(".", self.sep)


@dataclass(frozen=True)
class TextEncoder:
    prefix: str  # of its keys in the checkpoint
    kind: str  # "hf-clip", "openclip" or "t5": how its keys become Hugging Face module paths
    forms: tuple[NameForm, ...]


@dataclass(frozen=True)
class Scheme:
    kind: str  # "ldm", "dit", "peft" or "" (no LoRA names)
    prefixes: tuple[str, ...]  # of the diffusion model's keys ("" matches keys without one)
    exclude: tuple[str, ...]  # prefixes of keys that are no part of it (the VAE, ...)
    forms: tuple[NameForm, ...]
    text_encoders: tuple[TextEncoder, ...]
    modules: tuple[DitModule, ...]
    layers_only: bool  # extraction keeps weights inside numbered layers only


def _arch(arch: str | Architecture) -> Architecture:
    return architectures()[arch] if isinstance(arch, str) else arch


@lru_cache(maxsize=None)
def _spec(name: str) -> dict:
    doc = dict(architectures()[name].lora)
    parent = doc.pop("extends", None)
    return {**_spec(parent), **doc} if parent else doc


def lora_spec(arch: str | Architecture) -> dict:
    """The "lora" object of an architecture, with the fields of the one it `extends`."""
    return _spec(_arch(arch).name)


def _forms(items) -> tuple[NameForm, ...]:
    return tuple(NameForm(f["prefix"], f["sep"], f["style"], bool(f.get("write")), f.get("path", "native")) for f in items)


@lru_cache(maxsize=None)
def _scheme(name: str) -> Scheme:
    spec = _spec(name)
    model = spec.get("diffusion_model", {})
    return Scheme(
        kind=spec.get("scheme", ""),
        prefixes=tuple(model.get("prefixes", [])),
        exclude=tuple(model.get("exclude", [])),
        forms=_forms(model.get("names", [])),
        text_encoders=tuple(TextEncoder(t["prefix"], t["kind"], _forms(t["names"])) for t in spec.get("text_encoders", [])),
        modules=tuple(compile_module(m) for m in model.get("modules", [])),
        layers_only=bool(spec.get("extract_in_layers_only")),
    )


def _named(forms, paths: dict[str, str], target: Target, group: str) -> Iterator[ModuleName]:
    for form in forms:
        if form.path in paths:
            yield ModuleName(form.spell(paths[form.path]), target, group, form.write, form.style)


# text encoders ---------------------------------------------------------------------------------

def _te_names(key: str, shape, te: TextEncoder) -> Iterator[ModuleName]:
    rest = key[len(te.prefix):]
    if te.kind == "openclip":
        yield from _openclip_names(key, rest, shape, te)
        return
    path = rest.removesuffix(".weight")
    if te.kind == "hf-clip":
        wanted = path.startswith("text_model.encoder.layers.") and ("self_attn." in path or "mlp." in path)
    else:  # t5: attention and feed-forward of the encoder's blocks, not the position bias
        wanted = bool(T5_MODULE.match(path))
    if wanted and rest.endswith(".weight"):
        yield from _named(te.forms, {"native": path}, Target(key), "te")


def _openclip_names(key: str, rest: str, shape, te: TextEncoder) -> Iterator[ModuleName]:
    """OpenCLIP resblocks under Hugging Face CLIP module names."""
    layer, _, inner = rest.partition(".")
    if not layer.isdigit():
        return
    hf = f"text_model.encoder.layers.{layer}"
    if inner == "attn.in_proj_weight":
        d = shape[0] // 3
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            yield from _named(te.forms, {"native": f"{hf}.self_attn.{part}"}, Target(key, (i * d, (i + 1) * d)), "te")
        return
    module = inner.removesuffix(".weight")
    if module in OPENCLIP_RENAMES and inner.endswith(".weight"):
        yield from _named(te.forms, {"native": f"{hf}.{OPENCLIP_RENAMES[module]}"}, Target(key), "te")


# the diffusion model (or the whole model, peft) -------------------------------------------------

def _model_path(key: str, scheme: Scheme) -> str | None:
    if key.startswith(scheme.exclude):
        return None
    prefix = next((p for p in scheme.prefixes if key.startswith(p)), None)
    return None if prefix is None else key[len(prefix):-len(".weight")]


def _ldm_names(key: str, scheme: Scheme) -> Iterator[ModuleName]:
    path = _model_path(key, scheme)
    converted = ldm_paths(path) if path is not None else None
    if converted is not None:
        yield from _named(scheme.forms, converted[0], Target(key), converted[1])


def _dit_names(key: str, shape, scheme: Scheme) -> Iterator[ModuleName]:
    path = _model_path(key, scheme)
    if path is None:
        return
    for kind, module, rows, swap, group in dit_paths(path, shape, scheme.modules):
        yield from _named([f for f in scheme.forms if f.path == kind], {kind: module}, Target(key, rows, swap), group)


def _peft_names(key: str, scheme: Scheme) -> Iterator[ModuleName]:
    yield from _named(scheme.forms, {"native": key.removesuffix(".weight")}, Target(key), "linear")


def key_module_names(key: str, shape, arch: str | Architecture) -> Iterator[ModuleName]:
    """Every LoRA module name that may target this checkpoint key (of an `arch` model)."""
    if len(shape) < 2 or not (key.endswith(".weight") or key.endswith("in_proj_weight")):
        return
    scheme = _scheme(_arch(arch).name)
    te = next((t for t in scheme.text_encoders if key.startswith(t.prefix)), None)
    if te is not None:
        yield from _te_names(key, shape, te)
    elif not key.endswith(".weight"):
        return
    elif scheme.kind == "ldm":
        yield from _ldm_names(key, scheme)
    elif scheme.kind == "dit":
        yield from _dit_names(key, shape, scheme)
    elif scheme.kind == "peft":
        yield from _peft_names(key, scheme)


def module_names(shapes: Mapping[str, tuple], arch: str | Architecture) -> list[ModuleName]:
    """All module names of a checkpoint ({key: shape}), preferred or not."""
    return [m for key, shape in shapes.items() for m in key_module_names(key, tuple(shape), arch)]


def lora_names_map(shapes: Mapping[str, tuple], arch: str | Architecture) -> dict[str, ModuleName]:
    """{module name: ModuleName} for every name a LoRA file may use on this checkpoint."""
    return {m.name: m for m in module_names(shapes, arch)}


def lora_map(shapes: Mapping[str, tuple], arch: str | Architecture) -> dict[str, Target]:
    """{module name: target} for every name a LoRA file may use on this checkpoint."""
    return {m.name: m.target for m in module_names(shapes, arch)}


def extraction_targets(shapes: Mapping[str, tuple], arch: str | Architecture, conv: bool,
                       style: str | None = None) -> list[ModuleName]:
    """The modules a LoRA usually trains, under the names mergebuild writes (or, with style,
    under that naming's): SD attention blocks (Transformer2DModel children), transformer
    blocks, the text encoders' attention and MLP; with conv, also ResBlocks, down- and
    upsamplers (LoCon); peft-scheme models: every 2-D weight inside a layer."""
    arch = _arch(arch)
    groups = {"unet", "te", "linear"} | ({"unet_conv"} if conv else set())
    chosen = (lambda m: m.preferred) if style is None else (lambda m: m.style == style)
    out = [m for m in module_names(shapes, arch) if chosen(m) and m.group in groups]
    if _scheme(arch.name).layers_only:
        out = [m for m in out if arch.layer_of(m.target.key) is not None]
    return out


def full_tensor_names(shapes: Mapping[str, tuple], arch: str | Architecture) -> dict[str, ModuleName]:
    """{name: ModuleName} for each whole tensor of the checkpoint a LoRA file may hold, under a
    peft-scheme form with a prefix: base_model.model.<key> (PEFT's modules_to_save), and
    base_model.model.<module>.base_layer.<leaf> (the base weight of a targeted embedding, which
    PEFT saves with save_embedding_layers)."""
    scheme = _scheme(_arch(arch).name)
    if scheme.kind != "peft":
        return {}
    prefixes = [f.prefix for f in scheme.forms if f.prefix]
    out = {}
    for key in shapes:
        module, _, leaf = key.rpartition(".")
        for p in prefixes:
            for name in (p + key, f"{p}{module}.base_layer.{leaf}" if module else None):
                if name is not None:
                    out[name] = ModuleName(name, Target(key), "linear", False, "peft")
    return out


def full_tensor_name(key: str, arch: str | Architecture) -> str | None:
    """The name mergebuild writes a whole tensor under (its written peft form's prefix + key);
    None when the architecture's LoRAs have no such names."""
    scheme = _scheme(_arch(arch).name)
    form = next((f for f in scheme.forms if f.write and f.prefix), None) if scheme.kind == "peft" else None
    return None if form is None else form.prefix + key

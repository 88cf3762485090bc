"""The "dit" LoRA naming scheme: diffusion transformers with their authors' key names (BFL's
Flux, SAI's MMDiT), whose LoRAs come under the checkpoint's own module names (kohya) or under
the module names of diffusers' port (diffusers, ai-toolkit, SimpleTuner, PEFT, ...).

The table of modules is data (the "lora" object of an architecture's file): each entry names a
module of the checkpoint, with {n} for a block index, and the Diffusers module(s) it holds.
diffusers splits some fused modules: BFL's img_attn.qkv is to_q, to_k and to_v, linear1 is
to_q, to_k, to_v and proj_mlp. A Diffusers module of a fused one targets a row slice of it, of
relative height `split` ([1, 1, 1] for q, k, v; [1, 1, 1, 4] for q, k, v, mlp): the slices'
sizes come from the weight's shape, never from a model's known widths.

Two-chunk adaLN modulations (`swap_halves`: Flux's and SD3's final layer, SD3's last context
block) are [shift; scale] in the checkpoint and [scale; shift] in diffusers: a Diffusers module
of one targets the weight with its two row halves swapped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class DitModule:
    pattern: re.Pattern  # the checkpoint's module path, {n} a block index
    diffusers: tuple[str, ...]  # Diffusers module path templates, one per row slice
    split: tuple[int, ...]  # relative heights of those slices
    group: str  # "unet" (what LoRAs train, extracted) or "unet_top" (embedders, final layer)
    swap_halves: bool


def compile_module(entry: dict) -> DitModule:
    """One entry of a "modules" table: {"native", "diffusers": [..], "split"?, "group"?, "swap_halves"?}."""
    native = re.escape(entry["native"]).replace(r"\{n\}", r"(?P<n>\d+)")
    diffusers = tuple(entry["diffusers"])
    split = tuple(entry.get("split", [1] * len(diffusers)))
    if len(split) != len(diffusers):
        raise ValueError(f"LoRA module table: {entry['native']} has {len(diffusers)} Diffusers modules, split {split}")
    return DitModule(re.compile(native), diffusers, split, entry.get("group", "unet"), bool(entry.get("swap_halves")))


def slices(module: DitModule, shape) -> list[tuple[int, int]] | None:
    """The row slice of each Diffusers module; None when the weight's rows do not split so."""
    unit, rest = divmod(shape[0], sum(module.split))
    if rest or unit == 0:
        return None
    out, start = [], 0
    for height in module.split:
        out.append((start, start + height * unit))
        start += height * unit
    return out


def swapped(module: DitModule, shape) -> bool:
    """Whether the Diffusers module sees the rows' halves swapped: two-chunk modulations only
    (rows = 2 x features; SD3's other context blocks have six chunks, in the same order)."""
    return module.swap_halves and len(shape) == 2 and shape[0] == 2 * shape[1]


def dit_paths(path: str, shape, modules: tuple[DitModule, ...]) -> Iterator[tuple[str, str, tuple | None, bool, str]]:
    """(kind, module path, rows, swapped, group) of every path a LoRA may name this weight's
    module by: kind "native" (the checkpoint's own path) or "diffusers". A module the table
    lacks gets its native path only, in group "unet_other" (named, never extracted)."""
    for module in modules:
        m = module.pattern.fullmatch(path)
        if m is None:
            continue
        yield "native", path, None, False, module.group
        parts = slices(module, shape)
        if parts is None:
            return
        swap = swapped(module, shape)
        for template, rows in zip(module.diffusers, parts):
            diffusers = template.replace("{n}", m.group("n")) if "{n}" in template else template
            yield "diffusers", diffusers, (rows if len(parts) > 1 else None), swap, module.group
        return
    yield "native", path, None, False, "unet_other"

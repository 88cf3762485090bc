"""Methods that take parts of models: a component, attention layers, a VAE; and position ids."""

from __future__ import annotations

import re

from mergebuild.layouts.blocks import expand_blocks
from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch

def take_b(*tensors, **_params):
    """B's tensor, for the keys the method selects (A's everywhere else). Called with B alone
    (the method reads only B), or with A and B where A is needed (inpainting channels, clip)."""
    return tensors[-1].clone()


def _swap_selects(key: str, params: dict, arch, block) -> bool:
    component, match = params["component"], params["match"]
    if not component and not match:
        raise ValueError("swap needs component or match")
    hit = False
    if component:
        prefixes = arch.components.get(component)
        if prefixes is None:
            raise ValueError(f"{arch.name} has no component {component!r} (has: {', '.join(arch.components)})")
        hit = any(key.startswith(p) for p in prefixes)
    return hit or bool(match and re.search(match, key))


def _attention_selects(key: str, params: dict, arch, block) -> bool:
    parts = params["parts"].split()
    if not any(f".{p}." in key or key.endswith(f".{p}") or f".{p}_" in key for p in parts):
        return False
    if not params["blocks"]:
        return True
    if not arch.blocks:
        raise ValueError(f"{arch.name} models have no blocks: leave blocks empty and use parts")
    return block in expand_blocks(params["blocks"], arch)


def _vae_prefixes(arch) -> tuple[str, ...]:
    prefixes = arch.components.get("vae")
    if not prefixes:
        raise ValueError(f"{arch.name} models have no VAE component")
    return prefixes


def _vae_selects(key: str, params: dict, arch, block) -> bool:
    return key.startswith(_vae_prefixes(arch))


def _vae_names(key: str, i: int, arch) -> tuple[str, ...]:
    # a standalone VAE file has no prefix; a full checkpoint has it
    prefix = next((p for p in _vae_prefixes(arch) if key.startswith(p)), None)
    return (key.removeprefix(prefix), key) if prefix else (key,)


def position_ids(*, shape: list[int]):
    """CLIP's position ids reset to 0, 1, 2, ... (sd-meh's fix for corrupted float ids)."""
    n = 1
    for d in shape:
        n *= d
    return torch.arange(n, dtype=torch.int64).reshape(shape)


POSITION_IDS = Method("fix_clip_position_ids", 1, position_ids, (), (), position_ids.__doc__)

# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "supermerger's and A1111's component swaps"
METHODS = [
    Method("swap", 1, take_b, ("A", "B"), (
        Param("component", str, "", "taken from B: text_encoder, unet or vae, or one its architecture "
              "names (clip_l, clip_g, t5xxl, transformer, ema; LLMs embeddings, lm_head): docs/blocks.md"),
        Param("match", str, "", "a regular expression (re.search on the key): the keys it finds are taken from B"),
    ), "Take a component (text encoder, UNet, VAE) or the keys matching a pattern from B.",
       select=_swap_selects, elementwise=True, reads=(1,)),
    Method("attention_swap", 1, take_b, ("A", "B"), (
        Param("blocks", str, "", "MBW blocks as in rules, names and ranges: 'IN04-IN08 M00'; empty: every block"),
        Param("parts", str, "attn1 attn2", "which layers, space-separated: attn1 (self-attention), attn2 "
              "(cross-attention), ff (feed-forward)"),
    ), "Take attention (attn1 / attn2) or feed-forward (ff) layers of chosen blocks from B.",
       select=_attention_selects, elementwise=True, reads=(1,)),
    Method("bake_vae", 1, take_b, ("A", "VAE"), (),
           "Replace A's VAE (first_stage_model.* in SD, vae.* in Flux) with a VAE file's; only keys A has are written.",
           select=_vae_selects, input_names=_vae_names, elementwise=True, reads=(1,)),
]

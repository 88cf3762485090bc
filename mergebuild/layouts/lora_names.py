"""LoRA module names of a checkpoint's keys: a forward map, never a parse of '_'-joined names.

Every weight key of the checkpoint is converted to each module name a LoRA file may use for it
(kohya names with Diffusers or LDM/SGM paths, Diffusers-PEFT names, PEFT names); a LoRA module
is then looked up by name. '_' is ambiguous in kohya names ("to_q", "proj_in", "layers_0"), so
a name is never split back into a path.

A module's target is a checkpoint key plus an optional row slice: OpenCLIP text encoders (SD2,
SDXL's CLIP-G) fuse q, k and v in one `attn.in_proj_weight` [3d, d]; the q, k and v modules of
a LoRA are its rows [0, d), [d, 2d) and [2d, 3d), in PyTorch MultiheadAttention order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

from mergebuild.layouts.blocks import architectures

UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."  # + text_model.encoder.layers.N...
SD2_TE = "cond_stage_model.model.transformer.resblocks."
SDXL_TE1 = "conditioner.embedders.0.transformer."  # + text_model...
SDXL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."

# LDM ResBlock children -> Diffusers ResnetBlock2D children
RESNET_RENAMES = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut",
}
TOP_RENAMES = {
    "input_blocks.0.0": "conv_in", "out.2": "conv_out", "out.0": "conv_norm_out",
    "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
}
# OpenCLIP residual block children -> Hugging Face CLIP encoder layer children
OPENCLIP_RENAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

# the UNet modules kohya's LoRA trains: children of Transformer2DModel (attention blocks); LoCon
# adds those of ResnetBlock2D, Downsample2D and Upsample2D
ATTENTION_PARTS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class Target:
    """Where a LoRA module applies: a checkpoint key, and rows [start, stop) of it (or all)."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModuleName:
    name: str
    target: Target
    # "unet" (attention blocks), "unet_conv" (ResBlocks, samplers: LoCon), "unet_top" (conv_in,
    # conv_out, embeddings), "te" (text encoders), "linear" (generic models)
    group: str
    preferred: bool  # the name mergebuild writes (kohya's for SD, PEFT's for generic models)


def ldm_to_diffusers(path: str) -> tuple[str, str] | None:
    """An LDM UNet module path (no "model.diffusion_model.", no ".weight") -> (Diffusers path,
    group), or None for modules no LoRA names (norms of the output, ...)."""
    if path in TOP_RENAMES:  # conv_in, conv_out, time and label embeddings: no LoCon trains them
        return TOP_RENAMES[path], "unet_top"
    parts = path.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    block, n, rest = parts[0], int(parts[1]), parts[2:]
    if block == "input_blocks":
        i, j = divmod(n - 1, 3)
        if n == 0:
            return None
        if j == 2:  # input_blocks.3/6/9.0.op: the downsamplers
            return (f"down_blocks.{i}.downsamplers.0.conv", "unet_conv") if rest == ["0", "op"] else None
        return _resnet_or_attention(f"down_blocks.{i}", j, rest)
    if block == "middle_block":
        if n == 1:
            return _resnet_or_attention("mid_block", 0, ["1", *rest])
        return _resnet_or_attention("mid_block", n // 2, ["0", *rest])
    if block == "output_blocks":
        i, j = divmod(n, 3)
        if rest[0] in ("1", "2") and rest[1:] == ["conv"]:  # output_blocks.(3i+2).(1|2).conv
            return f"up_blocks.{i}.upsamplers.0.conv", "unet_conv"
        return _resnet_or_attention(f"up_blocks.{i}", j, rest)
    return None


def _resnet_or_attention(prefix: str, j: int, rest: list[str]) -> tuple[str, str] | None:
    kind, inner = rest[0], ".".join(rest[1:])
    if kind == "0":  # the ResBlock
        for ldm, diffusers in RESNET_RENAMES.items():
            if inner == ldm:
                return f"{prefix}.resnets.{j}.{diffusers}", "unet_conv"
        return None
    if kind == "1" and inner:  # the SpatialTransformer: same child names in both layouts
        return f"{prefix}.attentions.{j}.{inner}", "unet"
    return None


def _kohya(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def _unet_names(key: str, arch: str) -> Iterator[ModuleName]:
    path = key[len(UNET):-len(".weight")]
    target = Target(key)
    converted = ldm_to_diffusers(path)
    if converted is None:
        return
    diffusers, group = converted
    if group == "unet" and not any(path.endswith("." + p) for p in ATTENTION_PARTS):
        group = "unet_other"  # norms and the like inside attention blocks: named, never extracted
    sgm_preferred = arch == "sdxl"  # kohya writes SGM names for SDXL, Diffusers names for SD1/SD2
    yield ModuleName(_kohya("lora_unet", diffusers), target, group, not sgm_preferred)
    yield ModuleName(_kohya("lora_unet", path), target, group, sgm_preferred)
    yield ModuleName(f"unet.{diffusers}", target, group, False)  # Diffusers (PEFT) LoRA files


def _clip_names(key: str, prefix: str, kohya: str, diffusers: str) -> Iterator[ModuleName]:
    """Hugging Face CLIP keys (SD1 text encoder, SDXL CLIP-L)."""
    path = key[len(prefix):-len(".weight")]
    if not path.startswith("text_model.encoder.layers.") or not ("self_attn." in path or "mlp." in path):
        return
    target = Target(key)
    yield ModuleName(_kohya(kohya, path), target, "te", True)
    yield ModuleName(f"{diffusers}.{path}", target, "te", False)


def _openclip_names(key: str, shape, prefix: str, kohya: str, diffusers: str) -> Iterator[ModuleName]:
    """OpenCLIP resblocks (SD2 text encoder, SDXL CLIP-G) under Hugging Face CLIP module names."""
    rest = key[len(prefix):]
    layer, _, inner = rest.partition(".")
    if not layer.isdigit():
        return
    hf = f"text_model.encoder.layers.{layer}"
    if inner == "attn.in_proj_weight":
        d = shape[0] // 3
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            target = Target(key, (i * d, (i + 1) * d))
            yield ModuleName(_kohya(kohya, f"{hf}.self_attn.{part}"), target, "te", True)
            yield ModuleName(f"{diffusers}.{hf}.self_attn.{part}", target, "te", False)
        return
    module = inner.removesuffix(".weight")
    if module in OPENCLIP_RENAMES and inner.endswith(".weight"):
        target = Target(key)
        yield ModuleName(_kohya(kohya, f"{hf}.{OPENCLIP_RENAMES[module]}"), target, "te", True)
        yield ModuleName(f"{diffusers}.{hf}.{OPENCLIP_RENAMES[module]}", target, "te", False)


def _generic_names(key: str) -> Iterator[ModuleName]:
    module = key.removesuffix(".weight")
    yield ModuleName(f"base_model.model.{module}", Target(key), "linear", True)
    yield ModuleName(module, Target(key), "linear", False)


def key_module_names(key: str, shape, arch: str) -> Iterator[ModuleName]:
    """Every LoRA module name that may target this checkpoint key (of an `arch` model)."""
    if len(shape) < 2 or not (key.endswith(".weight") or key.endswith("in_proj_weight")):
        return
    if key.startswith(UNET) and arch in ("sd1", "sd2", "sdxl"):
        yield from _unet_names(key, arch)
    elif key.startswith(SD1_TE) and arch in ("sd1", "sd2"):
        yield from _clip_names(key, SD1_TE, "lora_te", "text_encoder")
    elif key.startswith(SD2_TE) and arch == "sd2":
        yield from _openclip_names(key, shape, SD2_TE, "lora_te", "text_encoder")
    elif key.startswith(SDXL_TE1) and arch == "sdxl":
        yield from _clip_names(key, SDXL_TE1, "lora_te1", "text_encoder")
    elif key.startswith(SDXL_TE2) and arch == "sdxl":
        yield from _openclip_names(key, shape, SDXL_TE2, "lora_te2", "text_encoder_2")
    elif arch == "generic" and key.endswith(".weight"):
        yield from _generic_names(key)


def module_names(shapes: Mapping[str, tuple], arch: str) -> list[ModuleName]:
    """All module names of a checkpoint ({key: shape}), preferred or not."""
    return [m for key, shape in shapes.items() for m in key_module_names(key, tuple(shape), arch)]


def lora_map(shapes: Mapping[str, tuple], arch: str) -> dict[str, Target]:
    """{module name: target} for every name a LoRA file may use on this checkpoint."""
    return {m.name: m.target for m in module_names(shapes, arch)}


def extraction_targets(shapes: Mapping[str, tuple], arch: str, conv: bool) -> list[ModuleName]:
    """The modules a LoRA usually trains, under the names mergebuild writes: SD attention blocks
    (Transformer2DModel children) and the text encoders' attention and MLP; with conv, also
    ResBlocks, down- and upsamplers (LoCon); generic models: every 2-D weight inside a layer."""
    groups = {"unet", "te", "linear"} | ({"unet_conv"} if conv else set())
    out = [m for m in module_names(shapes, arch) if m.preferred and m.group in groups]
    if arch == "generic":
        layer_of = architectures()["generic"].layer_of
        out = [m for m in out if layer_of(m.target.key) is not None]
    return out

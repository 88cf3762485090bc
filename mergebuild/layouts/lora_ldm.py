"""The "ldm" LoRA naming scheme: Stable Diffusion UNets with LDM / SGM key names.

kohya names a UNet module either by its Diffusers path (down_blocks.0.attentions.0...) or by
its own LDM path (input_blocks.1.1...); Diffusers-PEFT files use the Diffusers path. Which name
forms an architecture accepts, and which one mergebuild writes, is data (the "lora" object of
its file); this module only converts LDM paths to Diffusers paths (A1111's rules).
"""

from __future__ import annotations

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
# the UNet modules kohya's LoRA trains: children of Transformer2DModel (attention blocks); LoCon
# adds those of ResnetBlock2D, Downsample2D and Upsample2D
ATTENTION_PARTS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


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


def ldm_paths(path: str) -> tuple[dict[str, str], str] | None:
    """{"native": LDM path, "diffusers": Diffusers path} of a UNet module, and its group; None
    for modules no LoRA names."""
    converted = ldm_to_diffusers(path)
    if converted is None:
        return None
    diffusers, group = converted
    if group == "unet" and not any(path.endswith("." + p) for p in ATTENTION_PARTS):
        group = "unet_other"  # norms and the like inside attention blocks: named, never extracted
    return {"native": path, "diffusers": diffusers}, group

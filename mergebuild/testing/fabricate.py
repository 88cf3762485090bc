"""Fabricate checkpoints with the real key names and (optionally shrunk) shapes of a layout.

    python -m mergebuild.testing.fabricate --out examples/models            # the demo's models
    python -m mergebuild.testing.fabricate --shrink 1 --dtype float16 ...   # full size (benchmarks)

A "base" is random; each "fine-tune" is the base plus a little noise of its own, as real
fine-tunes are close to their base. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergebuild.layouts import layout_names, load_layout

SMALL_DIM = 8  # dims up to this (kernel sizes, latent channels) are kept as they are


def shrink_shape(shape, factor: int) -> tuple[int, ...]:
    return tuple(d if d <= SMALL_DIM or factor == 1 else max(SMALL_DIM, d // factor) for d in shape)


def layout_keys(layout: str, shrink: int = 32, components: set[str] | None = None) -> dict[str, tuple]:
    """{key: (shape, torch dtype)} of a layout, shrunk; EMA keys are left out unless asked for."""
    keys = {}
    for key, info in load_layout(layout)["keys"].items():
        component = info["component"]
        if components is not None and component not in components:
            continue
        if components is None and component == "ema":
            continue
        keys[key] = (shrink_shape(info["shape"], shrink), getattr(torch, info["dtype"]))
    return keys


def llama_keys(layers: int = 4, hidden: int = 16, intermediate: int = 40, vocab: int = 64) -> dict[str, tuple]:
    """A Llama-shaped state dict's keys (Hugging Face names), tiny."""
    keys = {"model.embed_tokens.weight": ((vocab, hidden), torch.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            keys[p + f"self_attn.{proj}.weight"] = ((hidden, hidden), torch.float32)
        keys[p + "mlp.gate_proj.weight"] = ((intermediate, hidden), torch.float32)
        keys[p + "mlp.up_proj.weight"] = ((intermediate, hidden), torch.float32)
        keys[p + "mlp.down_proj.weight"] = ((hidden, intermediate), torch.float32)
        keys[p + "input_layernorm.weight"] = ((hidden,), torch.float32)
        keys[p + "post_attention_layernorm.weight"] = ((hidden,), torch.float32)
    keys["model.norm.weight"] = ((hidden,), torch.float32)
    keys["lm_head.weight"] = ((vocab, hidden), torch.float32)
    return keys


def make_base(keys: dict, seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, kdtype) in keys.items():
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[-1], dtype=kdtype).reshape(shape)
        elif not kdtype.is_floating_point:
            out[key] = torch.zeros(shape, dtype=kdtype)
        else:
            out[key] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return out


def make_finetune(base: dict, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in base.items():
        if t.is_floating_point() and "." in key:  # scheduler buffers (alphas_cumprod) have no dots
            out[key] = (t.float() + torch.randn(t.shape, generator=g) * scale).to(t.dtype)
        else:
            out[key] = t.clone()
    return out


def llama_trio(seed: int = 17, **shape) -> dict[str, dict]:
    """A tiny float16 Llama base and two fine-tunes of it ({"base", "a", "b"}): the trio the
    mergekit parity data was made from (tests/data/mergekit_0.1.5)."""
    base = make_base(llama_keys(**shape), seed=seed, dtype=torch.float16)
    return {"base": base, "a": make_finetune(base, seed=seed + 1), "b": make_finetune(base, seed=seed + 2)}


def tensor_sha256(t) -> str:
    """The sha256 of a tensor's bytes (how stored peer outputs are compared without storing them)."""
    import hashlib

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def fabricate_family(out: Path, layout: str = "sd1-ldm", shrink: int = 32, dtype=torch.float16,
                     names=("base", "real", "anime"), prefix: str = "sd15-") -> list[Path]:
    """Write a base and fine-tunes of it; returns their paths. Skips files that exist."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}{n}.safetensors" for n in names]
    if all(p.exists() for p in paths):
        return paths
    keys = layout_keys(layout, shrink)
    base = make_base(keys, seed=0, dtype=dtype)
    for i, path in enumerate(paths):
        model = base if i == 0 else make_finetune(base, seed=i)
        save_file(model, str(path), metadata={"format": "pt"})
        del model
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("examples/models"))
    p.add_argument("--layout", default="sd1-ldm", choices=layout_names(), help="whose key names and shapes")
    p.add_argument("--shrink", type=int, default=32, help="divide large dims by this (1 = full size)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--prefix", default="sd15-")
    p.add_argument("--lora", action="store_true", help="also write a LoRA for the base (the demo bakes it)")
    args = p.parse_args()
    paths = fabricate_family(args.out, args.layout, args.shrink, getattr(torch, args.dtype), prefix=args.prefix)
    if args.lora:
        paths.append(fabricate_lora(paths[0], args.out / f"{args.prefix}detail-lora.safetensors", args.layout))
    for path in paths:
        print(path)


def fabricate_lora(base: Path, path: Path, layout: str = "sd1-ldm") -> Path:
    """A kohya-format LoRA (rank 4, UNet attention and text encoder) for the model at `base`."""
    from safetensors.torch import load_file

    from mergebuild.layouts.blocks import detect
    from mergebuild.testing.lora import make_lora

    if not path.exists():
        arch = detect(load_layout(layout)["keys"])[0].name
        lora = make_lora(load_file(str(base)), arch, rank=4, seed=7, dtype=torch.float16,
                         targets=r"(attn[12]\.to_[qkv]|self_attn\.(q|k|v)_proj|attn\.qkv|linear1)")
        save_file(lora, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return path


if __name__ == "__main__":
    main()

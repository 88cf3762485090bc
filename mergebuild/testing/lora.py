"""Fabricate LoRA / LyCORIS files for tests and examples, with the names real trainers write.

    sd = make_lora(checkpoint, "sd1", rank=4, fmt="locon", seed=1)
    save_lora(path, sd)

checkpoint: a state dict, {key: shape}, {key: (shape, dtype)} (fabricate.layout_keys) or a list of
(key, shape) pairs.
Formats: "lora" (kohya, attention and text-encoder modules), "locon" (also ResBlocks and
samplers; cp=True gives k x k convolutions a lora_mid), "loha" (tucker=True: hada_t1/t2 on k x k
convolutions), "lokr" (full w1, w2 = w2_a @ w2_b, or full w2 with decompose_w2=False), "dora"
(LoCon plus dora_scale [1, in(, 1, 1)]), "peft" (lora_A / lora_B under PEFT / Diffusers names,
no alpha). LoHa, LoKr and DoRA target the LoCon modules, as LyCORIS does by default.
targets: None (the modules of the format), a list of checkpoint keys, or a regular expression.
naming: None (the names mergebuild writes; "peft": Diffusers names where the model has them), or
a style of layouts.lora_names ("kohya", "diffusers", "lycoris", "onetrainer", ...): Flux's and
SD3's Diffusers modules are row slices of the fused ones kohya names.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergebuild.layouts.lora_names import extraction_targets, lora_spec

FORMATS = ("lora", "locon", "loha", "lokr", "dora", "peft")


def _te_prefix(arch: str, index: int) -> str:
    return lora_spec(arch)["text_encoders"][index]["prefix"]


# key prefixes of the SD checkpoints' parts (tests group modules by them); from the arch files
UNET = lora_spec("sd1")["diffusion_model"]["prefixes"][0]
SD1_TE = _te_prefix("sd1", 0)
SD2_TE = _te_prefix("sd2", 1)
SDXL_TE1, SDXL_TE2 = _te_prefix("sdxl", 0), _te_prefix("sdxl", 1)


def _shapes(checkpoint) -> dict[str, tuple]:
    """{key: shape} from a state dict, {key: shape}, {key: (shape, dtype)} or (key, shape) pairs."""
    out = {}
    items = checkpoint.items() if hasattr(checkpoint, "items") else checkpoint
    for key, value in items:
        if isinstance(value, torch.Tensor):
            out[key] = tuple(value.shape)
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple):
            out[key] = value[0]  # (shape, dtype)
        else:
            out[key] = tuple(value)
    return out


def lora_modules(checkpoint, arch: str, fmt: str = "lora", targets=None,
                 naming: str | None = None) -> list[tuple[str, str, tuple | None]]:
    """[(module name, checkpoint key, rows)] that make_lora writes."""
    return [(m.name, m.target.key, m.target.rows) for m in chosen_modules(checkpoint, arch, fmt, targets, naming)]


def chosen_modules(checkpoint, arch: str, fmt: str = "lora", targets=None, naming: str | None = None) -> list:
    """The layouts.lora_names.ModuleName of each module make_lora writes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r} (known: {', '.join(FORMATS)})")
    shapes = _shapes(checkpoint)
    conv = fmt in ("locon", "loha", "lokr", "dora") or targets is not None
    if naming is None and fmt == "peft":  # Diffusers-PEFT names (unet.*, transformer.*, text_encoder*.*)
        naming = "diffusers" if extraction_targets(shapes, arch, conv, style="diffusers") else None
    chosen = extraction_targets(shapes, arch, conv=conv, style=naming)
    if isinstance(targets, str):
        chosen = [m for m in chosen if re.search(targets, m.target.key)]
    elif targets is not None:
        wanted = set(targets)
        chosen = [m for m in chosen if m.target.key in wanted]
    return chosen


def _factor(n: int) -> int:
    """The largest divisor of n not above its square root (LyCORIS factorises dims near sqrt)."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def make_lora(checkpoint, arch: str, rank: int = 4, fmt: str = "lora", targets=None, seed: int = 0,
              alpha: float | None = None, dtype=torch.float32, scale: float = 0.1, cp: bool = False,
              tucker: bool = False, decompose_w2: bool = True, naming: str | None = None) -> dict[str, torch.Tensor]:
    """A LoRA state dict for `checkpoint` (see the module docstring). alpha defaults to rank / 2
    (a scale of 0.5, so that a forgotten alpha / r shows)."""
    g = torch.Generator().manual_seed(seed)
    shapes = _shapes(checkpoint)
    alpha = rank / 2 if alpha is None else alpha
    out: dict[str, torch.Tensor] = {}

    def rand(*shape):
        return torch.randn(shape, generator=g) * scale

    for name, key, rows in lora_modules(checkpoint, arch, fmt, targets, naming):
        shape = shapes[key]
        rows_n = rows[1] - rows[0] if rows else shape[0]
        inn, kernel = shape[1], tuple(shape[2:])
        kk = math.prod(kernel)
        t: dict[str, torch.Tensor] = {}
        if fmt in ("lora", "locon", "dora", "peft"):
            up = rand(rows_n, rank, *([1] * len(kernel)))
            if cp and kk > 1:
                t["lora_mid.weight"] = rand(rank, rank, *kernel)
                down = rand(rank, inn, *([1] * len(kernel)))
            else:
                down = rand(rank, inn, *kernel)
            if fmt == "peft":
                t["lora_B.weight"], t["lora_A.weight"] = up, down
            else:
                t["lora_up.weight"], t["lora_down.weight"] = up, down
            if fmt == "dora":
                t["dora_scale"] = torch.rand((1, inn, *([1] * len(kernel))), generator=g) + 0.5
        elif fmt == "loha":
            for n in (1, 2):
                if tucker and kk > 1:
                    t[f"hada_t{n}"] = rand(rank, rank, *kernel)
                    t[f"hada_w{n}_a"], t[f"hada_w{n}_b"] = rand(rank, rows_n), rand(rank, inn)
                else:
                    t[f"hada_w{n}_a"], t[f"hada_w{n}_b"] = rand(rows_n, rank), rand(rank, inn * kk)
        else:  # lokr
            a, c = _factor(rows_n), _factor(inn)
            t["lokr_w1"] = rand(a, c)
            if decompose_w2:
                t["lokr_w2_a"], t["lokr_w2_b"] = rand(rows_n // a, rank), rand(rank, (inn // c) * kk)
            else:
                t["lokr_w2"] = rand(rows_n // a, inn // c, *kernel)
        if fmt != "peft":
            t["alpha"] = torch.tensor(float(alpha))
        out.update({f"{name}.{suffix}": v.to(dtype) for suffix, v in t.items()})
    return out


def save_lora(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write a LoRA state dict as .safetensors, with kohya's network metadata by default."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata=metadata if metadata is not None else {"ss_network_module": "networks.lora"})
    return path

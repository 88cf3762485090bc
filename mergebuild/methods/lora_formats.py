"""LoRA and LyCORIS formats: tensor names, and the weight update each module makes (pure math).

A module's tensors are named <module>.<suffix>; `split_key` maps the suffix to a role. Every
update is computed in float32 (float64 if given) and includes the module's scale:
    s = .scale if the module has one, else alpha / r (alpha missing: s = 1; alpha = 0: s = 0, as
    kohya), except LoKr with both factors full: s = 1 (A1111, ComfyUI).
Shapes (out = output features, in = input features, k = kernel):
    LoRA / LoCon   up [out, r(,1,1)], down [r, in(,k,k)]: dW = up @ down, reshaped
    LoCon CP       mid [r, r, k, k], down [r, in, 1, 1]: dW[o,i] = sum_nm up[o,n] mid[n,m] down[m,i]
    LoHa           (w1a @ w1b) * (w2a @ w2b); Tucker: W1[o,i] = sum_ab t1[a,b] w1a[a,o] w1b[b,i]
    LoKr           kron(W1, W2), W1 = w1 or w1a @ w1b, W2 = w2, w2a @ w2b or CP(t2, w2a, w2b)
    DoRA           W'' = (W + dW) * dora_scale / |W + dW|, the norm per input column when
                   dora_scale is [1, in, ...] (kohya, LyCORIS), per output row when it is
                   [out, 1, ...] or [out] (PEFT's lora_magnitude_vector); the update is W'' - W.
    transposed     PEFT's embeddings (lora_embedding_A [r, V], lora_embedding_B [D, r]) and
                   fan_in_fan_out adapters: dW = (up @ down)^T, for a weight stored [in, out].
    full           a whole tensor (PEFT's modules_to_save): dW = saved - W.
A module may carry its own scale (a PEFT adapter's, from adapter_config.json): it replaces
.scale and alpha / r.
"""

from __future__ import annotations

import math

from mergebuild.torchlazy import torch

# tensor name suffix -> role; PEFT's lora_A / lora_B are down / up
SUFFIXES = {
    ".lora_up.weight": "lora_up", ".lora_down.weight": "lora_down", ".lora_mid.weight": "lora_mid",
    ".lora_B.weight": "lora_up", ".lora_A.weight": "lora_down",
    ".lora_embedding_B": "lora_up", ".lora_embedding_A": "lora_down",
    ".alpha": "alpha", ".scale": "scale", ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale",
    **{f".hada_{n}": f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f".lokr_{n}": f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}
FORMAT_NAMES = {"lora": "LoRA", "locon": "LoCon", "cp": "LoCon-CP", "loha": "LoHa", "lokr": "LoKr", "full": "full"}
EMBEDDING_SUFFIXES = (".lora_embedding_B", ".lora_embedding_A")  # PEFT's embedding LoRA: (up, down), transposed


def split_key(name: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_up.weight' -> ('lora_unet_x', 'lora_up'); None if no LoRA suffix."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], SUFFIXES[suffix]
    return None


def module_format(roles) -> str | None:
    """'lora', 'loha' or 'lokr' from a module's roles; None when incomplete or unknown."""
    roles = set(roles)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= roles:
        return "loha"
    if roles & {"lokr_w1", "lokr_w1_a"} and roles & {"lokr_w2", "lokr_w2_a"}:
        w1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles
        w2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
        return "lokr" if w1 and w2 else None
    if {"lora_up", "lora_down"} <= roles:
        return "lora"
    return None


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def delta_numel(fmt: str, shapes: dict) -> int:
    """How many elements the module's update has, from its tensors' shapes (checked against the
    target before anything is computed)."""
    if fmt == "lora":
        up, down = shapes["lora_up"], shapes["lora_down"]
        kernel = shapes["lora_mid"][2:] if "lora_mid" in shapes else down[2:]
        return up[0] * down[1] * _prod(kernel)
    if fmt == "loha":
        a, b = shapes["hada_w1_a"], shapes["hada_w1_b"]
        if "hada_t1" in shapes:
            return a[1] * b[1] * _prod(shapes["hada_t1"][2:])
        return a[0] * _prod(b[1:])
    w1 = shapes["lokr_w1"] if "lokr_w1" in shapes else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
    if "lokr_w2" in shapes:
        w2 = _prod(shapes["lokr_w2"])
    elif "lokr_t2" in shapes:
        w2 = shapes["lokr_w2_a"][1] * shapes["lokr_w2_b"][1] * _prod(shapes["lokr_t2"][2:])
    else:
        w2 = shapes["lokr_w2_a"][0] * _prod(shapes["lokr_w2_b"][1:])
    return _prod(w1) * w2


def rank_of(fmt: str, shapes: dict) -> int | None:
    """r of alpha / r; None when the module has no rank (LoKr with both factors full)."""
    if fmt == "lora":
        return shapes["lora_down"][0]
    if fmt == "loha":
        return shapes["hada_w1_b"][0]
    if "lokr_w2_b" in shapes:
        return shapes["lokr_w2_b"][0]
    if "lokr_w1_b" in shapes:
        return shapes["lokr_w1_b"][0]
    return None


def module_scale(fmt: str, t: dict, rank: int | None = None) -> float:
    """The scale of a module's update: .scale, or alpha / r (see the module docstring); rank
    gives r when t lacks the tensors it comes from."""
    if "scale" in t:
        return float(t["scale"].reshape(-1)[0])
    r = rank if rank is not None else rank_of(fmt, {k: tuple(v.shape) for k, v in t.items()})
    if r is None or "alpha" not in t:
        return 1.0
    return float(t["alpha"].reshape(-1)[0]) / r


def _f(x):
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def cp_weight(t, wa, wb):
    """Tucker/CP rebuild: out[p, r, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, r]."""
    return torch.einsum("ijkl,ip,jr->prkl", t, wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1))


def lora_delta(up, down, mid=None):
    """up @ down, unscaled, as [out, in*k*k] (or [out, in, k, k] with a CP mid)."""
    up2 = _f(up).reshape(up.shape[0], -1)
    if mid is not None:
        return torch.einsum("nmkl,on,mi->oikl", _f(mid), up2, _f(down).reshape(down.shape[0], -1))
    return up2 @ _f(down).reshape(down.shape[0], -1)


def loha_delta(t: dict, shape):
    def half(n):
        a, b = _f(t[f"hada_w{n}_a"]), _f(t[f"hada_w{n}_b"])
        if f"hada_t{n}" in t:
            return cp_weight(_f(t[f"hada_t{n}"]), a, b)
        return a @ b.reshape(b.shape[0], -1)

    return (half(1).reshape(shape)) * (half(2).reshape(shape))


def lokr_delta(t: dict, shape):
    w1 = _f(t["lokr_w1"]) if "lokr_w1" in t else _f(t["lokr_w1_a"]) @ _f(t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = _f(t["lokr_w2"])
    elif "lokr_t2" in t:
        w2 = cp_weight(_f(t["lokr_t2"]), _f(t["lokr_w2_a"]), _f(t["lokr_w2_b"]))
    else:
        w2 = _f(t["lokr_w2_a"]) @ _f(t["lokr_w2_b"]).reshape(t["lokr_w2_b"].shape[0], -1)
    w1 = w1.reshape(w1.shape[0], -1)
    a, c = w1.shape
    if shape[0] % a or shape[1] % c:
        raise ValueError(f"LoKr factor {list(w1.shape)} does not divide the weight {list(shape)}")
    extra = tuple(shape[2:])
    w1 = w1.reshape(a, c, *([1] * len(extra)))
    w2 = w2.reshape(shape[0] // a, shape[1] // c, *extra)
    return torch.kron(w1, w2)


def delta(fmt: str, t: dict, shape, scale: float | None = None):
    """The module's scaled update dW, float32, in the target's shape (scale: the module's own,
    in place of .scale or alpha / r)."""
    shape = tuple(shape)
    if fmt == "lora":
        d = lora_delta(t["lora_up"], t["lora_down"], t.get("lora_mid"))
    elif fmt == "loha":
        d = loha_delta(t, shape)
    elif fmt == "lokr":
        d = lokr_delta(t, shape)
    else:
        raise ValueError(f"unknown LoRA format {fmt!r}")
    if d.numel() != math.prod(shape):
        raise ValueError(f"{FORMAT_NAMES[fmt]} update has {d.numel()} values, the weight {list(shape)} has {math.prod(shape)}")
    return d.reshape(shape) * (module_scale(fmt, t) if scale is None else scale)


def dora_update(weight, d, dora_scale):
    """DoRA: W'' - W with W'' = (W + dW) * dora_scale / |W + dW| (see the module docstring)."""
    merged = weight + d
    m = _f(dora_scale)
    if m.dim() > 1 and m.shape[0] == 1 and m.numel() == weight.shape[1]:
        dims = [0, *range(2, weight.dim())]  # a norm per input column
        m = m.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2)))
    elif m.numel() == weight.shape[0]:
        dims = list(range(1, weight.dim()))  # a norm per output row
        m = m.reshape(weight.shape[0], *([1] * (weight.dim() - 1)))
    else:
        raise ValueError(f"dora_scale {list(dora_scale.shape)} fits neither the rows nor the columns of {list(weight.shape)}")
    norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True) + torch.finfo(merged.dtype).eps
    return merged * (m / norm) - weight


def swap_halves(t):
    """The two row halves exchanged: BFL's [shift; scale] <-> diffusers' [scale; shift]. Its own
    inverse; on a LoRA's update it equals swapping the up matrix's rows (never the down's)."""
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


def bake(weight, *tensors, modules):
    """W + sum_i m_i dW_i over the modules that target this key; each module names its tensors'
    positions (tensors[j]), its format, multiplier m, optional row slice [start, stop) and
    whether it sees the rows' halves swapped (swap: its dW is swapped back before it is added),
    its own scale and whether its update is transposed (see the module docstring).
    DoRA modules decompose against the original W, so the order of the LoRAs does not matter."""
    w = _f(weight)
    out = w.clone()
    for mod in modules:
        t = {role: tensors[j] for role, j in mod["tensors"].items()}
        rows = mod.get("rows")
        base = w[rows[0]:rows[1]] if rows else w
        if mod["format"] == "full":
            (out[rows[0]:rows[1]] if rows else out).add_(_f(t["full"]).reshape(base.shape) - base,
                                                          alpha=mod["multiplier"])
            continue
        if mod.get("swap"):
            base = swap_halves(base)
        if mod.get("transpose"):
            base = base.T
        d = delta(mod["format"], t, base.shape, mod.get("scale"))
        if "dora_scale" in t:
            d = dora_update(base, d, t["dora_scale"])
        if mod.get("transpose"):
            d = d.T
        if mod.get("swap"):
            d = swap_halves(d)
        (out[rows[0]:rows[1]] if rows else out).add_(d, alpha=mod["multiplier"])
    return out


# making LoRAs: concatenation (exact sums) and truncated SVD ---------------------------------------

def _module_tensors(tensors, mod) -> dict:
    return {role: tensors[j] for role, j in mod["tensors"].items()}


def concat_up(*tensors, modules, shape):
    """Ups of several LoRA modules side by side, each times its multiplier and scale (so the
    result has scale 1): with the downs stacked, sum_i m_i s_i up_i down_i exactly."""
    parts = []
    for mod in modules:
        t = _module_tensors(tensors, mod)
        up = _f(t["lora_up"])
        scale = mod["scale"] if "scale" in mod else module_scale("lora", t, mod["rank"])
        parts.append(up.reshape(up.shape[0], -1) * (mod["multiplier"] * scale))
    return torch.cat(parts, dim=1).reshape(shape)


def concat_down(*tensors, modules, shape):
    """Downs stacked along the rank; a CP mid is folded in (down' = mid x down: a k x k down)."""
    parts = []
    for mod in modules:
        t = _module_tensors(tensors, mod)
        down = _f(t["lora_down"])
        if "lora_mid" in t:
            down = torch.einsum("nmkl,mi->nikl", _f(t["lora_mid"]), down.reshape(down.shape[0], -1))
        parts.append(down.reshape(down.shape[0], -1))
    return torch.cat(parts, dim=0).reshape(shape)


def svd_factors(d2, rank: int, clamp_quantile: float = 1.0):
    """Truncated SVD of a 2-D update: up = U_R S_R, down = Vh_R (so alpha = R gives scale 1).
    clamp_quantile < 1 clamps both to that quantile of their absolute values (kohya uses 0.99)."""
    u, s, vh = torch.linalg.svd(d2, full_matrices=False)
    r = min(rank, s.shape[0])
    up, down = u[:, :r] * s[:r], vh[:r]
    if clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        hi = torch.quantile(values, clamp_quantile) if values.numel() <= 1 << 24 else values.max()
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up, down


def module_deltas(tensors, modules) -> list:
    """s_i dW_i of each LoRA module, as [out, in*k*k] (without the multipliers)."""
    out = []
    for mod in modules:
        t = _module_tensors(tensors, mod)
        d = lora_delta(t["lora_up"], t["lora_down"], t.get("lora_mid"))
        out.append(d.reshape(d.shape[0], -1) * (mod["scale"] if "scale" in mod else module_scale("lora", t)))
    return out


def svd_part(*tensors, part, modules, shape, rank, clamp_quantile=1.0):
    """One factor ("up" or "down") of the truncated SVD of sum_i m_i dW_i over LoRA modules."""
    total = None
    for mod, d in zip(modules, module_deltas(tensors, modules)):
        d = d * mod["multiplier"]
        total = d if total is None else total + d
    up, down = svd_factors(total, rank, clamp_quantile)
    return (up if part == "up" else down).reshape(shape)


def delta_merge_part(*tensors, part, modules, shape, rank, merge, clamp_quantile=1.0):
    """One factor of the truncated SVD of a TIES / DARE merge of the modules' s_i dW_i, each
    weighted by its multiplier: task_vectors.generalized_task_arithmetic over a zero base, with
    `merge` its arguments (sparsify, sign, density, normalize, lam, seed, key)."""
    from mergebuild.methods.task_vectors import generalized_task_arithmetic

    deltas = module_deltas(tensors, modules)
    merged = generalized_task_arithmetic(torch.zeros_like(deltas[0]), *deltas,
                                         weights=[m["multiplier"] for m in modules], **merge)
    up, down = svd_factors(merged, rank, clamp_quantile)
    return (up if part == "up" else down).reshape(shape)


def energy_rank(total: float, values: list[float], energy: float) -> int:
    """The smallest k whose k largest singular values hold `energy` of sum s_i^2 (total), at most
    len(values) (the cap); 0 when the difference is zero."""
    if total <= 0:
        return 0
    held = 0.0
    for k, v in enumerate(values, start=1):
        held += v * v
        if held >= energy * total * (1 - 1e-12):
            return k
    return len(values)


def epsilon_rank(values: list[float], epsilon: float) -> int:
    """mergekit's sv_epsilon: how many singular values exceed it (at most len(values))."""
    return sum(1 for v in values if v > epsilon)


def extract_part(tuned, base, *, part, shape, rank, rows=None, clamp_quantile=1.0, swap=False, alpha=None):
    """One factor of the truncated SVD of tuned - base (rows [start, stop) of it if given; with
    swap, its row halves exchanged, for a module that sees them so). alpha: the alpha the module
    is stored with (default: the rank); up is multiplied by rank / alpha, so that
    (alpha / rank) up @ down is the same."""
    d = _f(tuned) - _f(base)
    if rows:
        d = d[rows[0]:rows[1]]
    if swap:
        d = swap_halves(d)
    up, down = svd_factors(d.reshape(d.shape[0], -1), rank, clamp_quantile)
    if alpha is not None and part == "up":
        up = up * (up.shape[1] / alpha)
    return (up if part == "up" else down).reshape(shape)


def constant(*, value):
    """A scalar (the alpha of a LoRA module mergebuild writes)."""
    return torch.tensor(float(value))

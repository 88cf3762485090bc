"""How far each parity mode is from mergebuild's default, on fabricated inputs: the numbers quoted
in docs/methods.md.

    python benchmarks/parity.py           # a few seconds; prints one line per measurement

The inputs are fabricated like real ones: fine-tunes of one base (base ~ N(0, 0.05), deltas ~
N(0, 0.01)) stored in float16, in SD1-like shapes, plus an unrelated pair (independent weights,
where (1 - a)·A and a·B cancel) for the arithmetic. "ulp" is one unit in the last place of the
default's result, in the output dtype. The previous rules (slerp version 1, the tie of
sign = "count") are frozen copies of the code before the modes were added.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mergebuild.methods import get_method

SHAPES = [(320, 320), (640, 320, 3, 3), (1280,), (768, 768), (320,), (4,)]
SEED = 1234


def fabricated(n_models: int, scale: float = 0.01, seed: int = SEED, dtype=torch.float16):
    """For each shape: a base and n fine-tunes of it, stored in `dtype`, given as float32."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        models = [(base.float() + torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(n_models)]
        out.append((base.float(), [m.float() for m in models]))
    return out


def run(name, *xs, **params):
    method = get_method(name)
    kwargs = {**method.defaults(), **params}
    if method.takes_key:
        kwargs.setdefault("key", "model.diffusion_model.input_blocks.1.1.proj_in.weight")
    return method.fn(*xs, **kwargs)


def _spacing(x, dtype):
    return np.spacing(np.abs(x.to(dtype).numpy())).astype(np.float64)


def report(what: str, new, old, dtype, inputs=None) -> None:
    """The share of elements whose bytes differ in `dtype`, and by how much: in ulps of the default's
    result, in ulps of the largest input at that element (where the inputs cancel, the result's
    own ulp is tiny), and in absolute terms."""
    res, inp, absd, n_diff, n = [], [], [], 0, 0
    for i, (a, b) in enumerate(zip(new, old)):
        a, b = a.to(dtype), b.to(dtype)
        d = (a.double() - b.double()).abs().numpy()
        n_diff += int((d > 0).sum())
        n += d.size
        res.append((d / _spacing(b, dtype)).ravel())
        absd.append(d.ravel())
        if inputs is not None:
            big = torch.stack([x.abs() for x in inputs[i]]).amax(0)
            inp.append((d / _spacing(big, dtype)).ravel())
    res, absd = np.concatenate(res), np.concatenate(absd)
    text = f"{what}: {100 * n_diff / n:.3g} % of elements differ"
    if n_diff:
        text += f", up to {res.max():.0f} ulps of the result"
        if inputs is not None:
            text += f" ({np.concatenate(inp).max():.2g} ulps of the largest input)"
        text += f", max abs {absd.max():.2g}"
    print(text)


def arithmetic() -> None:
    for pair, alphas in (("fine-tunes of one base", (0.3, 0.5)), ("unrelated models", (0.3,))):
        sets = fabricated(2) if pair.startswith("fine") else [(None, [m, m2]) for (_, [m]), (_, [m2])
                                                              in zip(fabricated(1, 0.05), fabricated(1, 0.05, seed=7))]
        for alpha in alphas:
            new = [run("weighted_sum", a, b, alpha=alpha, arithmetic="a1111", dtypes=["F16", "F16"])
                   for _, (a, b) in sets]
            old = [run("weighted_sum", a, b, alpha=alpha) for _, (a, b) in sets]
            report(f"weighted_sum fp16, {pair}, alpha {alpha}: a1111 vs exact", new, old, torch.float16,
                   [ab for _, ab in sets])
    sets = fabricated(2)
    for alpha in (1.0, 0.5):
        new = [run("add_difference", a, b, base, alpha=alpha, arithmetic="a1111", dtypes=["F16"] * 3)
               for base, (a, b) in sets]
        old = [run("add_difference", a, b, base, alpha=alpha) for base, (a, b) in sets]
        report(f"add_difference fp16 A + alpha (B - C), alpha {alpha}: a1111 vs exact", new, old, torch.float16,
               [(a, b, base) for base, (a, b) in sets])
    sets = fabricated(2, dtype=torch.float32)
    new = [run("weighted_sum", a, b, alpha=0.3, arithmetic="a1111", dtypes=["F32", "F32"]) for _, (a, b) in sets]
    old = [run("weighted_sum", a, b, alpha=0.3) for _, (a, b) in sets]
    report("weighted_sum fp32, alpha 0.3: a1111 vs exact", new, old, torch.float32, [ab for _, ab in sets])


def signs() -> None:
    for density in (0.2, 0.5):
        sets = fabricated(2)
        changed = total = 0
        for base, models in sets:
            new = run("ties", base, *models, density=density, sign="count")
            old = run("ties", base, *models, density=density, sign="count_mergekit")
            changed += int((new != old).sum())
            total += new.numel()
        print(f"ties, 2 fine-tunes, density {density}: sign count vs count_mergekit: "
              f"{100 * changed / total:.1f} % of elements differ (tied votes keep nothing)")


def rescale() -> None:
    sets = fabricated(1, dtype=torch.float32)
    factors = []
    for i, (base, (model,)) in enumerate(sets):
        if model.numel() <= 4:
            continue
        kept = run("dare", base, model, density=0.3, rescale="none", key=f"tensor{i}") - base
        l1 = run("dare", base, model, density=0.3, rescale="l1", key=f"tensor{i}") - base
        nz = kept != 0
        factors.append(float((l1[nz] / kept[nz]).mean()))
        print(f"  dare l1 factor, {model.numel()} entries: {factors[-1]:.3f}")
    print(f"dare density 0.3: rescale l1 factors {min(factors):.3f}-{max(factors):.3f} per tensor "
          f"against density's 1/0.3 = {1 / 0.3:.3f} (kept entries differ by "
          f"{100 * max(abs(f * 0.3 - 1) for f in factors):.1f} % at most)")
    ratios = []
    for base, (model,) in sets:
        if model.numel() <= 4:
            continue
        density = run("della", base, model, density=0.3, epsilon=0.1, sign="none", normalize=False) - base
        l1 = run("della", base, model, density=0.3, epsilon=0.1, sign="none", normalize=False, rescale="l1") - base
        nz = density != 0
        ratios.append((l1[nz] / density[nz]).abs())
    ratios = torch.cat(ratios)
    print(f"della density 0.3, epsilon 0.1: rescale l1 / density (1/p_i) per kept entry "
          f"{float(ratios.min()):.3f}-{float(ratios.max()):.3f}")


def ties_rules() -> None:
    for density in (0.2, 0.01):
        sets = fabricated(2)
        tensors = elements = total = 0
        for base, models in sets:
            new = run("ties", base, *models, density=density, ties_rules="mergekit")
            old = run("ties", base, *models, density=density)
            d = int((new != old).sum())
            tensors += d > 0
            elements += d
            total += new.numel()
        print(f"ties fp16, density {density}: ties_rules mergekit vs mergebuild: {tensors} of {len(sets)} tensors, "
              f"{100 * elements / total:.3f} % of elements differ")


def slerp_v1(a, b, alpha, variant):
    """slerp as it was (version 1): float64 trigonometry, lerp past |cos| > 0.9995 in both variants."""
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    if na <= 1e-8 or nb <= 1e-8:
        return torch.lerp(a, b, alpha)
    dot = (torch.sum(a * b).item() / na) / nb
    if abs(dot) > 0.9995 or not math.isfinite(dot):
        return torch.lerp(a, b, alpha)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s_a, s_b = math.sin((1.0 - alpha) * omega) / math.sin(omega), math.sin(alpha * omega) / math.sin(omega)
    if variant == "mecha":
        scale = na + alpha * (nb - na)
        s_a, s_b = s_a * scale / na, s_b * scale / nb
    out = a * s_a
    out.add_(b, alpha=s_b)
    return out


def slerp() -> None:
    far = [(m, m2) for (_, [m]), (_, [m2]) in zip(fabricated(1, 0.05), fabricated(1, 0.05, seed=7)) if m.numel() > 4]
    near = [(base, m) for base, [m] in fabricated(1, 0.0012, dtype=torch.float32) if base.numel() > 4]
    cos = [float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1))) for a, b in near]
    for variant in ("mergekit", "mecha"):
        for name, pairs in (("unrelated", far), (f"near-parallel (cos {min(cos):.5f}-{max(cos):.5f})", near)):
            new = [run("slerp", a, b, alpha=0.5, variant=variant) for a, b in pairs]
            old = [slerp_v1(a, b, 0.5, variant) for a, b in pairs]
            report(f"slerp {variant}, {name}, fp32, alpha 0.5: version 2 vs 1", new, old, torch.float32, pairs)
            report(f"slerp {variant}, {name}, written as fp16: version 2 vs 1", new, old, torch.float16, pairs)


if __name__ == "__main__":
    torch.set_num_threads(1)
    arithmetic()
    signs()
    rescale()
    ties_rules()
    slerp()

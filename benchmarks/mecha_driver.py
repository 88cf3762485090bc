"""Run one sd-mecha merge for benchmarks/gpu.py and print its timing as one JSON line.

    mecha-venv/bin/python benchmarks/mecha_driver.py weighted_sum cpu out.safetensors a.safetensors b.safetensors
    mecha-venv/bin/python benchmarks/mecha_driver.py ties cuda out.safetensors base.safetensors a.safetensors b.safetensors

Runs in sd-mecha's own interpreter (a separate venv: sd-mecha is no dependency of mergebuild),
so it imports nothing from mergebuild. The clock starts before the recipe is built and stops
after sd_mecha.merge has written and closed the output file: load, merge and save, end to end
(the interpreter start and `import sd_mecha` are left out, as gpu.py's mergebuild rows leave
out theirs). Prints {"seconds": s, "peak": bytes of torch.cuda.max_memory_allocated (0 on the
CPU), "threads": n, "sd_mecha": version}.

Merges, as sd-mecha 1.1.8 spells them (sd_mecha/extensions/builtin/merge_methods):
- weighted_sum: sd_mecha.weighted_sum(a, b, alpha=0.5) = lerp(a, b, 0.5), as mergebuild's.
- ties: what sd_mecha.add_difference_ties(base, a, b, alpha=1.0, k=0.2) builds, i.e.
  base + 1.0 * ties_sum(a - base, b - base, k=0.2), other settings at their defaults (composed
  by hand: see recipe()). Its k is
  the fraction kept (mergebuild's density; add_difference_ties's own default k=1.0 trims
  nothing, so k is passed). Where it differs from mergebuild's ties (sign "mass", normalize):
  * sign election: with the default vote_sgn=False sd-mecha elects the sign of the sum of the
    signs (a majority count, mergebuild's sign="count"); the paper's and mergebuild's default is
    the sign of the summed deltas ("mass", sd-mecha's vote_sgn=True, "TIES-SOUP" in its
    comments). With 2 fine-tunes that disagree the count is 0, so sd-mecha keeps neither (the
    entry stays at the base) where mergebuild keeps the larger one.
  * trim: it keeps every |delta| >= the k-th largest (equal values at the threshold are all
    kept, about one entry more than int(k * n)); mergebuild keeps exactly int(density * n).
  * nan_to_num on the merged delta. Same work per tensor otherwise (a kthvalue per delta, a
    stack, a sign vote, a masked mean), so the timing compares like with like.
sd_mecha.merge runs with merge_dtype float32 and output_dtype float16 (mergebuild's choice; also
sd-mecha's defaults), threads left to sd-mecha's default (min(max(open files, 2), CPUs, 4)),
and its default input/output finiteness checks on.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bar on stderr (tqdm >= 4.66 reads this)

import sd_mecha  # noqa: E402
import torch  # noqa: E402
from sd_mecha.extensions.builtin.merge_methods import linear  # noqa: E402

# The fabricated inputs carry the real SD1.5 LDM key names (shared/layouts/sd1-ldm.json); the
# config is named rather than inferred, so a detection miss fails loudly instead of merging a
# different key set.
CONFIG = "sd1-ldm"


def recipe(method: str, inputs: list[str]):
    models = [sd_mecha.model(p, config=CONFIG) for p in inputs]
    if method == "weighted_sum":
        a, b = models
        return sd_mecha.weighted_sum(a, b, alpha=0.5)
    if method == "ties":
        # The graph sd_mecha.add_difference_ties(base, a, b, alpha=1.0, k=0.2) builds, composed
        # from its own merge methods: the 1.1.8 wrapper itself raises AttributeError while
        # building the recipe (its add_difference compares base.merge_space == the ties_sum
        # node's merge_space, which is None before finalization, and MergeSpace.__eq__(None)
        # reads None.identifier). Same nodes, same merge work.
        base, *tuned = models
        deltas = [sd_mecha.subtract(m, base) for m in tuned]
        return linear.add_difference(base, sd_mecha.ties_sum(*deltas, k=0.2), alpha=1.0)
    if method == "dare":
        # sd-mecha's only DARE: ties_sum_with_dropout drops each delta entry with `probability`
        # (0.8: mergebuild's density 0.2), rescales by 1 / (1 - probability), then sums as its
        # TIES does (k=1.0: no trim, though it still takes a kthvalue; a sign vote; model stock's
        # t): more work per tensor than mergebuild's dare (drop, rescale, sum).
        base, *tuned = models
        deltas = [sd_mecha.subtract(m, base) for m in tuned]
        dropped = sd_mecha.ties_sum_with_dropout(*deltas, probability=0.8, k=1.0, seed=1)
        return linear.add_difference(base, dropped, alpha=1.0)
    raise SystemExit(f"mecha_driver: unknown method {method!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=("weighted_sum", "ties", "dare"))
    p.add_argument("device", help="cpu, cuda, cuda:0, ...")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("inputs", nargs="+", help="weighted_sum: A B; ties, dare: BASE A B")
    p.add_argument("--threads", type=int, default=None, help="sd_mecha.merge threads (default: its own guess)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"mecha_driver: {args.device} asked for, but this interpreter's torch {torch.__version__} has no CUDA")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sd_mecha.merge(
        recipe(args.method, args.inputs),
        merge_device=args.device,
        merge_dtype=torch.float32,
        output_device="cpu",
        output_dtype=torch.float16,
        threads=args.threads,
        output=args.output,
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    threads = args.threads if args.threads is not None else min(max(len(args.inputs) + 1, 2), os.cpu_count() or 0, 4)
    print(json.dumps({"seconds": seconds, "peak": peak, "threads": threads, "sd_mecha": sd_mecha_version()}))


def sd_mecha_version() -> str:
    from importlib.metadata import version

    return version("sd-mecha")


if __name__ == "__main__":
    main()

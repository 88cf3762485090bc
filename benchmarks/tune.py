"""Tune benchmark: trials per minute of `mergebuild tune` with the per-tensor cache and with
`--no-cache` (a fresh cache for every trial), on the same search.

    python benchmarks/tune.py                       # SD1-shaped models shrunk 8x, 12 trials each way
    python benchmarks/tune.py --shrink 16 --trials 6

The search: weighted_sum(real, anime) with `alpha = { default = 0.5, IN05 = { search = [0, 1] } }`
(or, --method ties, ties(base, real, anime) with `density = { default = 0.2, IN05 = { search =
[0.1, 0.9] } }`), so each trial moves one block (IN05), TPE with a fixed seed, so both modes sample the same points;
the scorer is a Python function (the mean of one IN05 tensor), so the figures are the build's.
Each mode runs the real CLI once in its own folder and cache; the per-trial seconds come from
--json (build + score, without the study's bookkeeping). Trials per minute are given over all
trials, and over the trials after the first (the first is a cold build in both modes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MERGEFILE = """
[models.base]
path = "{base}"
[models.real]
path = "{real}"
[models.anime]
path = "{anime}"

[merges.mix]
{merge}
output = "out/mix.safetensors"

[tune]
target = "mix"
python = "bench_score:score"
trials = {trials}
seed = 0
"""

MERGES = {
    "weighted_sum": 'method = "weighted_sum"\ninputs = ["real", "anime"]\n'
                    'alpha = {{ default = 0.5, IN05 = {{ search = [0.0, 1.0] }} }}',
    "ties": 'method = "ties"\ninputs = ["base", "real", "anime"]\n'
            'density = {{ default = 0.2, IN05 = {{ search = [0.1, 0.9] }} }}',
}

SCORER = """
from safetensors import safe_open

def score(path):
    with safe_open(path, "numpy") as f:
        return float(f.get_tensor("model.diffusion_model.input_blocks.5.1.proj_in.weight").astype("float64").mean())
"""


def run_mode(models: list[Path], folder: Path, method: str, trials: int, no_cache: bool) -> dict:
    folder.mkdir(parents=True)
    text = MERGEFILE.format(base=models[0], real=models[1], anime=models[2], merge=MERGES[method].format(),
                            trials=trials)
    (folder / "mergefile.toml").write_text(text)
    (folder / "bench_score.py").write_text(SCORER)
    env = {k: v for k, v in os.environ.items() if k != "MERGEBUILD_CACHE"}
    env["PYTHONPATH"] = str(ROOT)
    args = [sys.executable, "-m", "mergebuild", "tune", "--json", "-q"] + (["--no-cache"] if no_cache else [])
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"mergebuild tune failed ({proc.returncode}):\n{proc.stderr}")
    doc = json.loads(proc.stdout)
    seconds = [t["seconds"] for t in doc["trials"]]
    later = seconds[1:] or seconds
    return {
        "wall": wall, "first": seconds[0], "mean_after_first": statistics.mean(later),
        "median_after_first": statistics.median(later),
        "per_minute": 60 * len(seconds) / sum(seconds), "per_minute_after_first": 60 * len(later) / sum(later),
        "computed_after_first": statistics.mean(t["computed"] for t in doc["trials"][1:]) if len(seconds) > 1 else 0,
        "tensors": doc["trials"][0]["computed"] + doc["trials"][0]["reused"],
        "params": [t["params"] for t in doc["trials"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shrink", type=int, default=8, help="divide large dims by this (1 = full size)")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--method", choices=tuple(MERGES), default="weighted_sum",
                   help="the searched merge: weighted_sum (alpha of IN05) or ties (density of IN05)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from mergebuild.testing.fabricate import fabricate_family

    tmp = Path(tempfile.mkdtemp(prefix="mergebuild-bench-tune-"))
    try:
        models = fabricate_family(tmp / "models", "sd1-ldm", args.shrink, torch.float16)
        size = sum(m.stat().st_size for m in models[1:]) / 1e6
        print(f"models: SD1-shaped, shrink {args.shrink}, fp16, {size / 2:.0f} MB each; {args.method}; "
              f"{args.trials} trials per mode")
        cached = run_mode(models, tmp / "cached", args.method, args.trials, no_cache=False)
        fresh = run_mode(models, tmp / "no-cache", args.method, args.trials, no_cache=True)
        assert cached["params"] == fresh["params"], "both modes should sample the same points"
        print(f"tensors per build: {cached['tensors']}; computed per trial after the first: "
              f"cache {cached['computed_after_first']:.0f}, no cache {fresh['computed_after_first']:.0f}")
        print(f"{'':>10} {'wall s':>8} {'first s':>8} {'trial s':>8} {'trials/min':>11} {'after first':>12}")
        for name, r in (("cache", cached), ("no cache", fresh)):
            print(f"{name:>10} {r['wall']:8.1f} {r['first']:8.2f} {r['mean_after_first']:8.2f} "
                  f"{r['per_minute']:11.1f} {r['per_minute_after_first']:12.1f}")
        print(f"ratio (cache / no cache): {cached['per_minute'] / fresh['per_minute']:.1f}x trials per minute, "
              f"{cached['per_minute_after_first'] / fresh['per_minute_after_first']:.1f}x after the first trial")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

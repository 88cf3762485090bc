"""Ray tune benchmark: trials per minute of `mergebuild tune --ray` with 2 trials at once against
1, on one local Ray cluster (this machine), on the same search.

    python benchmarks/ray_tune.py                     # SD1-shaped models shrunk 8x, 8 trials each way
    python benchmarks/ray_tune.py --trials 6 --score-seconds 1.0
    python benchmarks/ray_tune.py --score-seconds 0 --score-wait 3   # a scorer on other hardware
    python benchmarks/ray_tune.py --trials 2 --build  # and a cold TIES build, local vs --ray

The search: weighted_sum(real, anime) with `alpha = { default = 0.5, IN05 = { search = [0, 1],
step = 0.125 } }` on a grid (9 points, so both runs evaluate the same points, in another order);
the scorer is a Python function that costs `--score-seconds` of CPU (matrix products, standing
in for an evaluation: lm-eval, a classifier) and then reads one IN05 tensor. One Ray cluster is
started in this process (`ray.init(num_cpus=2)`), and both runs join it with --ray=ADDRESS, so
Ray's start-up is paid once and not timed. Each run has its own folder and cold cache. Trials
per minute are over the span from the first trial's start to the last one's end on the workers
(from --json), and over the whole command (with connecting, the actors' start and the study).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MERGEFILE = """
[models.real]
path = "{real}"
[models.anime]
path = "{anime}"

[merges.mix]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = {{ default = 0.5, IN05 = {{ search = [0.0, 1.0], step = 0.125 }} }}
output = "out/mix.safetensors"

[tune]
target = "mix"
python = "bench_score:score"
sampler = "grid"
trials = {trials}
seed = 0
"""

SCORER = """
import time
import torch
from safetensors import safe_open

def score(path):
    time.sleep({wait})  # waiting on an evaluation elsewhere (a GPU, a service): no CPU here
    end = time.process_time() + {seconds}
    x = torch.randn(256, 256)
    while time.process_time() < end:  # an evaluation's CPU work
        x = torch.tanh(x @ x.T / 256)
    with safe_open(path, "pt") as f:
        t = f.get_tensor("model.diffusion_model.input_blocks.5.1.proj_in.weight").double()
    return -abs(float(t.mean()))
"""


def run(folder: Path, models: list[Path], address: str, parallel: int, trials: int, seconds: float) -> dict:
    folder.mkdir(parents=True)
    (folder / "mergefile.toml").write_text(MERGEFILE.format(real=models[1], anime=models[2], trials=trials))
    (folder / "bench_score.py").write_text(SCORER.format(seconds=seconds[0], wait=seconds[1]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mergebuild", "tune", "--json", "-q", f"--ray={address}",
                           "--parallel", str(parallel)], cwd=folder, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"tune --parallel {parallel} failed:\n{proc.stderr}")
    trials_ = json.loads(proc.stdout)["trials"]
    span = max(t["ray"]["finished"] for t in trials_) - min(t["ray"]["started"] for t in trials_)
    return {"trials": len(trials_), "wall": wall, "span": span, "pids": len({t["ray"]["pid"] for t in trials_}),
            "computed": sum(t["computed"] for t in trials_),
            "build": sum(t["seconds"] for t in trials_) / len(trials_)}


BUILD = """
[models.base]
path = "{base}"
[models.real]
path = "{real}"
[models.anime]
path = "{anime}"
[merges.final]
method = "ties"
inputs = ["base", "real", "anime"]
density = 0.3
output = "final.safetensors"
"""


def build(folder: Path, models: list[Path], ray: list[str]) -> tuple[float, dict]:
    """A cold build of TIES(base, real, anime), locally or with --ray=ADDRESS: seconds, --json."""
    folder.mkdir(parents=True)
    (folder / "mergefile.toml").write_text(BUILD.format(base=models[0], real=models[1], anime=models[2]))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mergebuild", "--json", "-q", *ray], cwd=folder, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"build {ray} failed:\n{proc.stderr}")
    return time.perf_counter() - started, json.loads(proc.stdout)


def builds(work: Path, models: list[Path], address: str) -> None:
    local, _ = build(work / "build-local", models, [])
    remote, doc = build(work / "build-ray", models, [f"--ray={address}"])
    same = (work / "build-local" / "final.safetensors").read_bytes() == (work / "build-ray" / "final.safetensors").read_bytes()
    ray = doc["ray"]
    print(f"cold TIES build, 1143 tensors: local {local:.1f} s, --ray {remote:.1f} s ({local / remote:.2f}x); "
          f"{ray['tasks']} tasks on {len(ray['worker_pids'])} workers, {ray['bytes_to_driver'] / 1e6:.1f} MB "
          f"to the driver; same bytes: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shrink", type=int, default=8)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--score-seconds", type=float, default=0.5, help="CPU seconds each scoring costs")
    ap.add_argument("--build", action="store_true", help="also time a cold TIES build, local vs --ray")
    ap.add_argument("--score-wait", type=float, default=0.0,
                    help="seconds each scoring waits without CPU (an evaluation on other hardware)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import ray

    from mergebuild.testing.fabricate import fabricate_family

    work = Path(tempfile.mkdtemp(prefix="mergebuild-ray-tune-"))
    try:
        models = fabricate_family(work / "models", "sd1-ldm", shrink=args.shrink)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        address = ray.get_runtime_context().gcs_address
        score = (args.score_seconds, args.score_wait)
        rows = {n: run(work / f"parallel-{n}", models, address, n, args.trials, score) for n in (1, 2)}
        if args.build:
            builds(work, models, address)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.trials} grid trials, scorer {args.score_seconds:g} CPU s + {args.score_wait:g} s waiting, "
          f"models shrunk {args.shrink}x, "
          f"{os.cpu_count()} cores")
    print(f"{'':>12} {'wall s':>7} {'span s':>7} {'trial s':>8} {'trials/min':>11} {'(wall)':>7} {'workers':>8}")
    for n, r in rows.items():
        print(f"{f'parallel {n}':>12} {r['wall']:7.1f} {r['span']:7.1f} {r['build']:8.2f} "
              f"{60 * r['trials'] / r['span']:11.1f} {60 * r['trials'] / r['wall']:7.1f} {r['pids']:8d}")
    one, two = rows[1], rows[2]
    print(f"ratio (2 / 1): {one['span'] / two['span']:.2f}x trials per minute on the workers, "
          f"{one['wall'] / two['wall']:.2f}x over the whole command")


if __name__ == "__main__":
    main()

"""Re-basin benchmark: weight matching over a full-size SD1.5 UNet (fabricated weights).

    python benchmarks/rebasin.py                 # full size (two ~2.1 GB fp16 checkpoints, a shuffled copy of B)
    python benchmarks/rebasin.py --shrink 10     # small, to check the script works
    python benchmarks/rebasin.py --iterations 5  # the sweeps' cap (default 5: the default 100 takes hours here)

Inputs: A and B from benchmarks/data (fabricated by mergebuild.testing.fabricate when missing, as
benchmarks/core.py does), and B with the units of every permutation group of the SD1 spec
shuffled (a structured random permutation per group; written once as ...-B-shuffled), so the
matching has real work to do: it should find the shuffle back.

Steps (each a subprocess; wall time, and peak RSS from os.wait4's rusage of that child):
  (a) baseline: mergebuild cold build of weighted_sum(A, B shuffled) -> fp16 output
  (b) mergebuild cold build of rebasin(A, B shuffled), alpha 0.5, iterations N: each sweep timed
  (c) the same with only alpha changed: the permutation must come from the cache (no sweep runs)
  (d) check: permute(A, B shuffled), which shares (b)'s cached permutation, must give B back
Ratios are to (a), measured in the same run. Figures go to benchmarks/results/rebasin-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


# ------------------------------------------------------------------------------------------------
# steps that run inside a child process (`rebasin.py _step NAME ...`)

def _child_fabricate(data: str, shrink: str) -> None:
    import torch

    from mergebuild.testing.fabricate import fabricate_family

    fabricate_family(Path(data), "sd1-ldm", int(shrink), torch.float16, names=("A", "B", "C"),
                     prefix=f"sd15-x{shrink}-")


def _child_shuffle(src: str, dst: str, seed: str) -> None:
    """B with every group of the SD1 permutation spec shuffled (blocks kept whole, as allowed)."""
    import torch
    from safetensors.torch import load_file, save_file

    from mergebuild.layouts.blocks import architectures
    from mergebuild.layouts.permutations import permutation_groups, tensor_axes
    from mergebuild.methods.rebasin import apply_permutations

    sd = load_file(src)
    unet = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    groups = permutation_groups(architectures()["sd1"], unet)
    gen = torch.Generator().manual_seed(int(seed))
    perms = {}
    for name, g in groups.items():
        s = g.size // g.blocks
        order = torch.randperm(g.blocks, generator=gen) if g.move_blocks else torch.arange(g.blocks)
        perms[name] = torch.cat([int(h) * s + torch.randperm(s, generator=gen) for h in order])
    for key, entries in tensor_axes(groups).items():
        sd[key] = apply_permutations(sd[key], [perms[n] for n, _, _ in entries], [[a, r] for _, a, r in entries])
    save_file(sd, dst)
    print(json.dumps({"groups": len(groups), "keys": len(tensor_axes(groups))}))


def _child_build(mergefile: str, cache: str, merge: str) -> None:
    """A build through the API, each weight-matching sweep timed (instrumentation only)."""
    from mergebuild.methods import weight_matching as wm
    from mergebuild.project import BuildOptions, build

    sweeps: list[float] = []
    original = wm.WeightMatching.sweep

    def timed(self, order):
        start = time.perf_counter()
        try:
            return original(self, order)
        finally:
            sweeps.append(time.perf_counter() - start)

    wm.WeightMatching.sweep = timed
    started = time.perf_counter()
    plan, results = build(BuildOptions(Path(mergefile), cache_dir=Path(cache)))
    stat = plan.merges[merge].statistic
    print(json.dumps({"sweeps": sweeps, "build_s": time.perf_counter() - started,
                      "statistic_s": stat.seconds if stat is not None else None,
                      "groups": len(stat.spec.outputs) if stat is not None else 0,
                      "computed": results[merge].computed}))


def _child_compare(p: str, q: str) -> None:
    """How many tensors of two safetensors files differ (data only)."""
    import torch
    from safetensors import safe_open

    with safe_open(p, "pt") as f, safe_open(q, "pt") as g:
        keys = set(f.keys())
        differ = sum(not torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in keys if k in set(g.keys()))
    print(json.dumps({"tensors": len(keys), "differ": differ}))


CHILD_STEPS = {"fabricate": _child_fabricate, "shuffle": _child_shuffle, "build": _child_build,
               "compare": _child_compare}


# ------------------------------------------------------------------------------------------------
# the parent: run and measure

def run(argv: list[str], label: str) -> None:
    """A preparation step as a child (fabricate, shuffle): not measured."""
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"step {label} failed (exit {proc.returncode})")


def run_measured(argv: list[str], label: str) -> dict:
    """argv as a child: its wall time, peak RSS (reaped by os.wait4, whose rusage is that child's)
    and the JSON line it printed last."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {label} failed (exit {os.waitstatus_to_exitcode(status)}): rerun it by hand: "
                         + " ".join(argv))
    lines = [l for l in out.decode().splitlines() if l.startswith("{")]
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "doc": json.loads(lines[-1]) if lines else {}}


def child(step: str, *args: str) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "_step", step, *args]


def write_mergefile(path: Path, a: Path, b: Path, method: str, alpha: float, iterations: int) -> None:
    extra = f"\niterations = {iterations}" if method == "rebasin" else ""
    path.write_text(f"""[models.A]
path = "{a}"
[models.B]
path = "{b}"

[merges.mix]
method = "{method}"
inputs = ["A", "B"]
alpha = {alpha}{extra}
output = "{path.parent / 'out' / 'mix.safetensors'}"
dtype = "float16"
""")


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_step":
        CHILD_STEPS[sys.argv[2]](*sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shrink", type=int, default=1, help="divide large dims by this (1 = full size; at most 10: "
                   "the GroupNorm groups need 32 channels)")
    p.add_argument("--iterations", type=int, default=5, help="weight matching's sweeps at most")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args()

    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    a, b = (data / f"sd15-x{args.shrink}-{n}.safetensors" for n in "AB")
    if not (a.exists() and b.exists()):
        print(f"fabricating checkpoints (shrink {args.shrink}) into {data} ...", flush=True)
        run(child("fabricate", str(data), str(args.shrink)), "fabricate")
    shuffled = data / f"sd15-x{args.shrink}-B-shuffled.safetensors"
    if not shuffled.exists():
        print("shuffling B's units by the SD1 permutation spec ...", flush=True)
        run(child("shuffle", str(b), str(shuffled), "0"), "shuffle")
    work = data / f"rebasin-x{args.shrink}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for f in (a, shuffled):  # warm the page cache: every step reads them
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass

    steps = {}
    base_mf, base_cache = work / "ws" / "mergefile.toml", work / "ws" / "cache"
    base_mf.parent.mkdir()
    write_mergefile(base_mf, a, shuffled, "weighted_sum", 0.5, 0)
    print("(a) weighted_sum, cold ...", flush=True)
    steps["a"] = run_measured(child("build", str(base_mf), str(base_cache), "mix"), "a")
    mf, cache = work / "rb" / "mergefile.toml", work / "rb" / "cache"
    mf.parent.mkdir()
    write_mergefile(mf, a, shuffled, "rebasin", 0.5, args.iterations)
    print(f"(b) rebasin, cold, at most {args.iterations} sweeps ...", flush=True)
    steps["b"] = run_measured(child("build", str(mf), str(cache), "mix"), "b")
    write_mergefile(mf, a, shuffled, "rebasin", 0.3, args.iterations)
    print("(c) rebasin, alpha changed ...", flush=True)
    steps["c"] = run_measured(child("build", str(mf), str(cache), "mix"), "c")
    text = mf.read_text().replace('method = "rebasin"', 'method = "permute"').replace("alpha = 0.3\n", "")
    mf.write_text(text.replace('dtype = "float16"\n', ""))
    print("(d) permute with the cached permutation, compared with B ...", flush=True)
    steps["d"] = run_measured(child("build", str(mf), str(cache), "mix"), "d")
    check = subprocess.run(child("compare", str(mf.parent / "out" / "mix.safetensors"), str(b)), cwd=ROOT,
                           capture_output=True, text=True, check=True)
    steps["d"]["check"] = json.loads(check.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)

    base = steps["a"]["seconds"]
    sweeps = steps["b"]["doc"]["sweeps"]
    lines = [
        f"mergebuild re-basin benchmark, shrink {args.shrink}: A, B shuffled {mb(a.stat().st_size)} fp16 each, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; page cache warm",
        f"permutation groups: {steps['b']['doc']['groups']}; sweeps run: {len(sweeps)} (cap {args.iterations})",
        f"{'step':<44} {'seconds':>9} {'x (a)':>7} {'peak RSS':>10}",
    ]
    names = {"a": "(a) weighted_sum cold (baseline)", "b": "(b) rebasin cold", "c": "(c) rebasin, only alpha changed"}
    for key, label in names.items():
        s = steps[key]
        lines.append(f"{label:<44} {s['seconds']:>9.1f} {s['seconds'] / base:>7.2f} {mb(s['peak_rss_bytes']):>10}")
    lines += [f"    weight matching: {steps['b']['doc']['statistic_s']:.1f} s; per sweep: "
              + ", ".join(f"{t:.1f}" for t in sweeps) + " s",
              f"    (c) sweeps run: {len(steps['c']['doc']['sweeps'])} (the permutation came from the cache)",
              f"    (d) permute from the cached permutation: {steps['d']['seconds']:.1f} s, sweeps run "
              f"{len(steps['d']['doc']['sweeps'])}; B found back: {steps['d']['check']['differ']} of "
              f"{steps['d']['check']['tensors']} tensors differ from B"]
    print("\n" + "\n".join(lines))
    args.results.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now()
    doc = {"date": now.isoformat(timespec="seconds"), "shrink": args.shrink, "iterations": args.iterations,
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                       "load_average_end": os.getloadavg()},
           "steps": steps, "table": lines}
    path = args.results / f"rebasin-{now:%Y-%m-%d}{'' if args.shrink == 1 else f'-x{args.shrink}'}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    if steps["c"]["doc"]["sweeps"]:
        raise SystemExit("MISS: the rebuild after changing only alpha recomputed the permutation")


if __name__ == "__main__":
    main()

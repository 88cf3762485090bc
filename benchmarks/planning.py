"""Planning benchmark: what a large Mergefile costs when little or nothing changes.

    python benchmarks/planning.py                          # this checkout, 200 merges
    python benchmarks/planning.py --before /tmp/mb-before  # and another checkout of mergebuild, same run
    python benchmarks/planning.py --merges 20 --shrink 128 # small, to check the script works

The Mergefile is a chain of `--merges` weighted sums over a fabricated SDXL-shaped pair (the real
2531 key names, dims divided by `--shrink`): m0 = ws(a, b), m{i} = ws(m{i-1}, b), the last one
written as fp16. That is merges x 2531 per-tensor keys. Every step is a child process,
`python -m mergebuild`, the code taken from the checkout through PYTHONPATH; wall and CPU seconds
(user + system) are both shown: on a shared VM the CPU seconds are the steadier figure.
  cold plan   `-n` on an empty cache and a fresh MERGEBUILD_HOME (the sources hashed too), per checkout
  build       the cold build, once, with this checkout (the builds are shared: what is compared is
              what each checkout's planning makes of the same cache)
  no-op       `-q` once built (median of --repeat), per checkout; one that computes or writes stops the run
  -n, status  the dry run and `status` once built, per checkout
  edit -n     the middle merge's alpha changed: the dry run, per checkout
  edit        that build, once: only the edited merge and those downstream compute (counted)
  edit no-op  the no-op after it, per checkout
Figures go to benchmarks/results/planning-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def fabricate(data: Path, shrink: int) -> None:
    """The SDXL-shaped pair (a base and a fine-tune of it), in a child (torch stays out of here)."""
    if (data / "b.safetensors").exists():
        return
    code = ("import sys; from safetensors.torch import save_file; "
            "from mergebuild.testing.fabricate import layout_keys, make_base, make_finetune; "
            f"a = make_base(layout_keys('sdxl-sgm', {shrink}), seed=1); "
            f"save_file(a, '{data}/a.safetensors', metadata={{'format': 'pt'}}); "
            f"save_file(make_finetune(a, seed=2), '{data}/b.safetensors', metadata={{'format': 'pt'}})")
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-c", code], check=True, env=_env(ROOT), cwd=data)


def mergefile_text(merges: int, edited: int | None = None) -> str:
    lines = ["[settings]", 'cache = "cache"', "[models.a]", 'path = "a.safetensors"', "[models.b]",
             'path = "b.safetensors"']
    previous = "a"
    for i in range(merges):
        alpha = 0.01 + i / 1000 + (0.25 if i == edited else 0)
        lines += [f"[merges.m{i}]", 'method = "weighted_sum"', f'inputs = ["{previous}", "b"]', f"alpha = {alpha:.3f}"]
        previous = f"m{i}"
    lines += ['output = "out/chain.safetensors"', 'dtype = "float16"']
    return "\n".join(lines) + "\n"


def _env(code: Path, home: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MERGEBUILD_CACHE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(code), NO_COLOR="1", COLUMNS="80")
    if home is not None:
        env["MERGEBUILD_HOME"] = str(home)
    return env


def timed(args: list[str], project: Path, code: Path, home: Path) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of `python -m mergebuild ARGS` run in `project`."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run([PY, "-m", "mergebuild", *args], cwd=project, env=_env(code, home),
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    print(f"  {code}: mergebuild {' '.join(args)}: {wall:.2f} s wall, {cpu:.2f} s CPU", file=sys.stderr, flush=True)
    if proc.returncode not in (0, 1):  # status --check may say 1
        raise SystemExit(f"mergebuild {' '.join(args)} ({code}) exited {proc.returncode}: {proc.stderr[-400:]}")
    return wall, cpu, proc.stdout


def computed_merges(stdout: str) -> tuple[int, int, list[str]]:
    """(merges that computed, tensors computed, the names of those merges) from `--json`."""
    merges = json.loads(stdout)["merges"]
    ran = [n for n, m in merges.items() if m["computed"]]
    return len(ran), sum(m["computed"] for m in merges.values()), ran


def measure(trees: dict[str, Path], data: Path, merges: int, repeat: int) -> dict[str, dict]:
    """Every step for every checkout. The builds (cold, then the edit) run once, with the last
    checkout's code, in one shared project: what is compared is what each checkout's planning
    makes of the same cache (the cache's format is the same)."""
    work = Path(tempfile.mkdtemp(prefix="mb-planning-"))
    home = work / "home"
    builder = list(trees.values())[-1]
    rows: dict[str, dict] = {label: {} for label in trees}
    try:
        for name in ("a.safetensors", "b.safetensors"):
            os.symlink(data / name, work / name)
        (work / "mergefile.toml").write_text(mergefile_text(merges))
        for label, code in trees.items():  # a fresh cache and fingerprint store each
            fresh = work / f"cold-{label}"
            fresh.mkdir()
            for name in ("a.safetensors", "b.safetensors", "mergefile.toml"):
                shutil.copy(work / name, fresh / name, follow_symlinks=False)
            rows[label]["cold plan"] = timed(["-n", "-q"], fresh, code, fresh / "home")[:2]
        build = timed(["-q", "--device", "cpu"], work, builder, home)[:2]
        for label, code in trees.items():
            rows[label]["build"] = build
            _quick(rows[label], work, code, home, repeat, "")
        middle = merges // 2
        (work / "mergefile.toml").write_text(mergefile_text(merges, edited=middle))
        for label, code in trees.items():
            rows[label]["edit -n"] = _median([timed(["-n", "-q"], work, code, home)[:2] for _ in range(repeat)])
        wall, cpu, out = timed(["-q", "--json", "--device", "cpu"], work, builder, home)
        count, tensors, ran = computed_merges(out)
        expected = [f"m{i}" for i in range(middle, merges)]
        for label, code in trees.items():
            rows[label]["edit"] = (wall, cpu)
            rows[label]["edit computed"] = {"merges": count, "tensors": tensors, "only downstream": ran == expected}
            _quick(rows[label], work, code, home, repeat, "edit ")
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quick(row: dict, work: Path, code: Path, home: Path, repeat: int, prefix: str) -> None:
    """No-op, -n and status on a built project; a no-op that computes or writes is an error."""
    runs = []
    for _ in range(repeat):
        wall, cpu, out = timed(["-q", "--json"], work, code, home)
        if any(m["computed"] or m["written"] for m in json.loads(out)["merges"].values()):
            raise SystemExit(f"{code}: the no-op built something")
        runs.append((wall, cpu))
    row[prefix + "no-op"] = _median(runs)
    if not prefix:
        row["-n"] = _median([timed(["-n", "-q"], work, code, home)[:2] for _ in range(repeat)])
        row["status"] = _median([timed(["status", "-q"], work, code, home)[:2] for _ in range(repeat)])


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


STEPS = ("cold plan", "build", "no-op", "-n", "status", "edit -n", "edit", "edit no-op")


def table(results: dict[str, dict]) -> str:
    labels = list(results)
    head = f"{'step':<12}" + "".join(f"{label + ' wall s':>15}{'cpu s':>8}" for label in labels)
    if len(labels) == 2:
        head += f"{'ratio wall':>11}{'cpu':>6}"
    lines = [head]
    for step in STEPS:
        line = f"{step:<12}"
        for label in labels:
            wall, cpu = results[label][step]
            line += f"{wall:>15.2f}{cpu:>8.2f}"
        if len(labels) == 2:
            (w0, c0), (w1, c1) = results[labels[0]][step], results[labels[1]][step]
            line += f"{w1 / w0:>11.2f}{c1 / max(c0, 1e-9):>6.2f}"
        lines.append(line)
    for label in labels:
        c = results[label]["edit computed"]
        lines.append(f"{label}: the edit computed {c['tensors']} tensors in {c['merges']} merges "
                     f"(only the edited merge and those downstream: {c['only downstream']})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merges", type=int, default=200)
    p.add_argument("--shrink", type=int, default=64, help="divide SDXL's large dims by this")
    p.add_argument("--repeat", type=int, default=3, help="runs of each quick step (the median is shown)")
    p.add_argument("--before", type=Path, help="another mergebuild checkout to measure in the same run")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "mb-planning-data")
    args = p.parse_args()
    data = args.data / f"sdxl-x{args.shrink}"
    fabricate(data, args.shrink)
    trees = ({"before": args.before.resolve()} if args.before else {}) | {"after": ROOT}
    results = measure(trees, data, args.merges, args.repeat)
    print(f"{args.merges} merges over an SDXL-shaped pair (dims / {args.shrink}), {os.cpu_count()} CPUs")
    print(table(results))
    out = HERE / "results" / f"planning-{dt.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"merges": args.merges, "shrink": args.shrink, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

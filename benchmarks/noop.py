"""The no-op: `mergebuild -q` on a project already built, this checkout against another.

    python benchmarks/noop.py --before /tmp/mb-before            # the demo (run `make demo` first)
    python benchmarks/noop.py --before /tmp/mb-before --args ""  # the same, printing its summary
    python benchmarks/noop.py --project DIR --home DIR            # another built project

Each run is a process of its own, `python -P -m mergebuild ARGS` in the project, the code taken
from each tree through PYTHONPATH; the trees alternate, run after run, and the medians of wall
and CPU seconds (user + system) are shown. Twice: with bytecode caches (.pyc, kept outside the
trees in a temporary PYTHONPYCACHEPREFIX, as an installed package has them) and without
(PYTHONDONTWRITEBYTECODE, every module compiled at each start, as on a read-only checkout). A
warm-up run per tree first: it writes the caches and, after an edit of a tree's code, the plan
summaries (planning/shortcut.py). Figures go to benchmarks/results/noop-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(code: Path, project: Path, args: list[str], env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one no-op; one that fails stops the benchmark."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, "-P", "-m", "mergebuild", *args], cwd=project,
                          env={**env, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{code}: mergebuild {' '.join(args)} exited {proc.returncode}: {proc.stderr[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(trees: dict[str, Path], project: Path, args: list[str], repeat: int, env: dict) -> dict:
    for code in trees.values():
        run(code, project, args, env)
    runs: dict[str, list] = {label: [] for label in trees}
    for _ in range(repeat):
        for label, code in trees.items():
            runs[label].append(run(code, project, args, env))
    return {label: {"wall": statistics.median(r[0] for r in rs), "cpu": statistics.median(r[1] for r in rs)}
            for label, rs in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="another mergebuild tree (a checkout or a copy) to measure beside this one")
    p.add_argument("--project", type=Path, default=ROOT, help="a built project (default: the demo, here)")
    p.add_argument("--home", type=Path, help="its MERGEBUILD_HOME (default: as set, or the user's)")
    p.add_argument("--args", default="-q", help="the command line, split at spaces (default: -q)")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    trees = ({"before": args.before.resolve()} if args.before else {}) | {"after": ROOT}
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE",
                                                             "PYTHONPYCACHEPREFIX")}
    if args.home is not None:
        base["MERGEBUILD_HOME"] = str(args.home)
    results = {}
    with tempfile.TemporaryDirectory(prefix="mb-pyc-") as pyc:
        for mode, extra in (("pyc", {"PYTHONPYCACHEPREFIX": pyc}), ("no pyc", {"PYTHONDONTWRITEBYTECODE": "1"})):
            results[mode] = measure(trees, args.project.resolve(), args.args.split(), args.repeat, {**base, **extra})
    print(f"mergebuild {args.args} in {args.project}: medians of {args.repeat}, {os.cpu_count()} CPUs")
    for mode, rows in results.items():
        line = "   ".join(f"{label} {r['wall']:.3f} s wall {r['cpu']:.3f} s CPU" for label, r in rows.items())
        if len(rows) == 2:
            line += f"   after/before CPU {rows['after']['cpu'] / rows['before']['cpu']:.2f}"
        print(f"{mode:>7}: {line}")
    out = HERE / "results" / f"noop-{dt.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": args.args, "project": str(args.project), "repeat": args.repeat,
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""One-block tweaks: what a rebuild costs in time and in cache disk, at full size.

    python benchmarks/tweaks.py                      # SD1.5 fp16 pair (2.1 GB each)
    python benchmarks/tweaks.py --layout sdxl-sgm    # SDXL fp16 pair (6.9 GB each; ~30 GB of disk)
    python benchmarks/tweaks.py --rev 52829c5        # mergebuild as committed at a revision

A two-step lineage: mix = weighted_sum(A, B) with alpha = { default = 0.5, IN07 = v } (an
intermediate), final = add_difference(mix, B, A) -> fp16 output. Steps, each a process of its
own (wall time, peak RSS from wait4): a cold build, a no-op, then five rebuilds each changing
IN07's value. After each: the cache's bytes on disk (files and folders, as `du` counts; SQLite's
-wal/-shm left out, they come and go) and the bytes of the tensors the tweak changed (IN07's,
in mix and in final). Results go to benchmarks/results/tweaks-<layout>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from core import MERGEBUILD, PY, ROOT, child, code_digest, fresh, git, pinned_code, run, warm  # noqa: E402

MB = 1e6
TWEAKS = (0.2, 0.3, 0.4, 0.5, 0.6)


def _child_fabricate(data: str, layout: str) -> None:
    import torch

    from mergebuild.testing.fabricate import fabricate_family

    for p in fabricate_family(Path(data), layout, 1, torch.float16, names=("A", "B"), prefix=f"{layout}-x1-"):
        print(p)


def _child_dirty_bytes(path: str) -> None:
    """Bytes of IN07's floating-point tensors in one fp16 model (the tensors a tweak changes)."""
    from mergebuild.tensors.header import read_header

    header = read_header(Path(path))
    print(sum(e.nbytes for k, e in header.tensors.items() if ".input_blocks.7." in k))


def mergefile(path: Path, a: Path, b: Path, out: Path, v: float) -> None:
    path.write_text(f"""[models.A]
path = "{a}"
[models.B]
path = "{b}"

[merges.mix]
method = "weighted_sum"
inputs = ["A", "B"]
alpha = {{ default = 0.5, IN07 = {v} }}

[merges.final]
method = "add_difference"
inputs = ["mix", "B", "A"]
alpha = 0.3
output = "{out}"
dtype = "float16"
""")


def du(folder: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(folder):
        total += sum(os.lstat(os.path.join(root, f)).st_blocks * 512 for f in files
                     if not f.endswith(("-wal", "-shm")))
        total += sum(os.lstat(os.path.join(root, d)).st_blocks * 512 for d in dirs)
    return total


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_step":
        {"fabricate": _child_fabricate, "dirty_bytes": _child_dirty_bytes}[sys.argv[2]](*sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="sd1-ldm", choices=("sd1-ldm", "sdxl-sgm"))
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--rev", help="benchmark mergebuild as committed at this git revision")
    args = p.parse_args()

    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    a, b = (data / f"{args.layout}-x1-{n}.safetensors" for n in "AB")
    if not (a.exists() and b.exists()):
        print(f"fabricating two full-size {args.layout} fp16 checkpoints into {data} ...", flush=True)
        run([PY, __file__, "_step", "fabricate", str(data), args.layout], "fabricate")
    warm([a, b])
    if args.rev:
        package = pinned_code(args.rev, data)
        env = {**os.environ, "PYTHONPATH": str(package)}
        code = {"source": f"git archive {args.rev}", "commit": git("rev-parse", args.rev)}
    else:
        package, env = ROOT, None
        code = {"source": "working tree", "commit": git("rev-parse", "HEAD"),
                "mergebuild_dirty": bool(git("status", "--porcelain", "mergebuild"))}
    code["digest"] = code_digest(package / "mergebuild")
    work = fresh(data / f"tweaks-{args.layout}")
    work.mkdir()
    mf, out, cache = work / "mergefile.toml", work / "out" / "final.safetensors", work / "cache"
    base = [*MERGEBUILD, "-f", str(mf), "--cache-dir", str(cache), "--json", "-q"]
    per_model = int(run([PY, __file__, "_step", "dirty_bytes", str(a)], "dirty")["stdout"])
    dirty = 2 * per_model  # IN07 in mix and in final
    rows = []

    def step(label: str, v: float) -> dict:
        mergefile(mf, a, b, out, v)
        before = du(cache) if cache.exists() else 0
        r = run(base, label, env)
        after = du(cache)
        report = json.loads(r["stdout"]) if r["stdout"].startswith("{") else {}
        computed = {n: m["computed"] for n, m in report.get("merges", {}).items()}
        row = {"step": label, "seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
               "cache_bytes": after, "cache_growth_bytes": after - before, "computed": computed}
        rows.append(row)
        print(f"  {label:<10} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_bytes'] / MB:7,.0f} MB  cache "
              f"{after / MB:9,.0f} MB (+{(after - before) / MB:,.0f} MB)  computed {computed}", flush=True)
        return row

    print(f"inputs: 2 x {a.stat().st_size / MB:,.0f} MB {args.layout}; code {code['source']} "
          f"{code['commit'][:10]}; tensors a tweak changes: {dirty / MB:,.1f} MB", flush=True)
    step("cold", 0.1)
    step("no-op", 0.1)
    for i, v in enumerate(TWEAKS, start=1):
        step(f"tweak {i}", v)
    tweaks = [r for r in rows if r["step"].startswith("tweak")]
    growth = [r["cache_growth_bytes"] for r in tweaks]
    summary = {
        "cold_s": rows[0]["seconds"], "noop_s": rows[1]["seconds"],
        "tweak_median_s": sorted(r["seconds"] for r in tweaks)[len(tweaks) // 2],
        "cache_after_cold_bytes": rows[0]["cache_bytes"], "cache_after_tweaks_bytes": tweaks[-1]["cache_bytes"],
        "growth_per_tweak_median_bytes": sorted(growth)[len(growth) // 2],
        "growth_over_dirty": sorted(growth)[len(growth) // 2] / dirty,
        "dirty_bytes": dirty, "model_bytes": out.stat().st_size,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
    }
    print("\n" + "\n".join(f"{k:<28} {v:,.2f}" if isinstance(v, float) else f"{k:<28} {v:,}" for k, v in summary.items()))
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"tweaks-{args.layout}-{dt.date.today()}-{code['commit'][:7]}.json"
    path.write_text(json.dumps({"date": dt.datetime.now().isoformat(timespec="seconds"), "layout": args.layout,
                                "code": code, "cpus": os.cpu_count(), "rows": rows, "summary": summary}, indent=2) + "\n")
    print(f"wrote {path}")
    fresh(work)


if __name__ == "__main__":
    main()

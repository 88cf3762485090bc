"""Selection benchmark: TIES and DARE on SD1.5-sized checkpoints, mergebuild against sd-mecha and a plain script.

    python benchmarks/selection.py --mecha-python /tmp/mecha-venv/bin/python --before /tmp/mb-before
    python benchmarks/selection.py --shrink 16 --rounds 1        # small, to check the script works

Three full-size fp16 checkpoints (a base A and fine-tunes B, C: the files benchmarks/core.py makes),
density 0.2, 3 models. Rows, each a subprocess timed by wall clock, peak RSS from os.wait4:
  mergebuild ties / dare        cold: a fresh cache and MERGEBUILD_HOME, -q, --device cpu
  mergebuild before ...         the same, with PYTHONPATH at --before (a checkout of the commit to
                                compare with, e.g. `git worktree add /tmp/mb-before 42e8e8b`)
  sd-mecha ties / dare          benchmarks/mecha_driver.py in --mecha-python (sd-mecha 1.1.8);
                                its DARE is ties_sum_with_dropout (drop, then its TIES sum: more work)
  plain torch script ties/dare  load_file the three, per tensor: float32 deltas, a kthvalue
                                threshold (>=) per delta, sign vote, masked mean / a rand mask, save_file
The rows run in R interleaved rounds (a shared machine's speed varies: each row's best is the
figure, its median beside it). The first round also compares mergebuild's output tensors with
--before's, byte for byte. Figures go to benchmarks/results/selection-<date>.json.
The parent stays small (stdlib only): a child's ru_maxrss can inherit the parent's high-water mark.

    python benchmarks/selection.py --largest --before /tmp/mb-before

measures peak RSS instead, against the bound for whole-tensor methods (1 GiB plus 4x the largest
tensor in float32): three bf16 files holding one tensor of Flux.1's largest shape (21504 x 3072,
264 MB in float32), a TIES and a DARE build of them, after and --before.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
DENSITY = 0.2

PLAIN = '''
import sys, torch
from safetensors.torch import load_file, save_file
method, out, *paths = sys.argv[1:]
a, b, c = (load_file(p) for p in paths)
g = torch.Generator().manual_seed(1)
result = {}
for k in a:
    if not a[k].is_floating_point():
        result[k] = a[k]
        continue
    base = a[k].float()
    ds = torch.stack([b[k].float() - base, c[k].float() - base])
    if method == "ties":
        n = ds[0].numel(); kk = max(1, int(%(d)s * n))
        flat = ds.reshape(2, -1).abs()
        thr = flat.kthvalue(n - kk + 1, dim=1).values.reshape(2, *([1] * ds[0].dim()))
        ds = torch.where(ds.abs() >= thr, ds, 0)
        sgn = torch.sign(ds.sum(0)); agree = (torch.sign(ds) == sgn) & (ds != 0)
        result[k] = (base + (ds * agree).sum(0) / agree.sum(0).clamp(min=1)).half()
    else:
        keep = torch.rand(ds.shape, generator=g) < %(d)s
        result[k] = (base + (ds * keep / %(d)s).sum(0)).half()
save_file(result, out)
''' % {"d": DENSITY}

MERGEFILE = '''[settings]
cache = "{cache}"
[models.a]
path = "{a}"
[models.b]
path = "{b}"
[models.c]
path = "{c}"
[merges.m]
method = "{method}"
inputs = ["a", "b", "c"]
density = {density}
{extra}output = "{out}"
dtype = "{dtype}"
'''
LARGEST = (21504, 3072)  # Flux.1's single_blocks.N.linear1.weight


def run(argv: list[str], label: str, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run argv as a child in `cwd` (not the checkout: its mergebuild/ would shadow PYTHONPATH's);
    its wall time and peak RSS (wait4's rusage)."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(err.decode(errors="replace")[-2000:])
        raise SystemExit(f"step {label} failed: {' '.join(argv)}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "user_s": usage.ru_utime}


def fabricate(data: Path, shrink: int) -> list[Path]:
    code = ("import sys, torch; from pathlib import Path; from mergebuild.testing.fabricate import fabricate_family; "
            f"[print(p) for p in fabricate_family(Path({str(data)!r}), 'sd1-ldm', {shrink}, torch.float16, "
            f"names=('A', 'B', 'C'), prefix='sd15-x{shrink}-')]")
    out = subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return [Path(line) for line in out.split()]


def mergebuild(work: Path, files: list[Path], method: str, tree: Path, tag: str,
               dtype: str = "float16") -> tuple[list[str], dict, Path]:
    """argv, env and output path of a cold mergebuild build of `method` from `tree`'s code."""
    out = work / f"out-{tag}-{method}.safetensors"
    cache = work / f"cache-{tag}-{method}"
    shutil.rmtree(cache, ignore_errors=True)
    extra = 'seed = 1\n' if method == "dare" else 'sign = "mass"\n'
    mergefile = work / f"{tag}-{method}.toml"
    mergefile.write_text(MERGEFILE.format(cache=cache, a=files[0], b=files[1], c=files[2], method=method,
                                          density=DENSITY, extra=extra, out=out, dtype=dtype))
    home = tempfile.mkdtemp(prefix="mb-home-", dir=work)
    env = {**os.environ, "PYTHONPATH": str(tree), "MERGEBUILD_HOME": home}
    return [PY, "-m", "mergebuild", "-f", str(mergefile), "--device", "cpu", "-q"], env, out


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes (from the safetensors header), metadata left out."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        digests = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(8 + size + begin)
            h, left = hashlib.sha256(), end - begin
            while left:
                chunk = f.read(min(left, 64 << 20))
                h.update(chunk)
                left -= len(chunk)
            digests[name] = f"{info['dtype']}{info['shape']}:{h.hexdigest()}"
    return digests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shrink", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--before", type=Path, help="a checkout of the code to compare with (rows 'mergebuild before')")
    p.add_argument("--mecha-python", help="a Python with sd-mecha 1.1.8 (rows 'sd-mecha'); none: rows left out")
    p.add_argument("--methods", default="ties,dare")
    p.add_argument("--largest", action="store_true", help="peak RSS of one Flux-sized tensor instead (see above)")
    args = p.parse_args()
    if args.largest:
        return largest(args)
    files = fabricate(args.data, args.shrink)
    work = Path(tempfile.mkdtemp(prefix="mergebuild-selection-", dir=args.data))
    methods = args.methods.split(",")
    rows: dict[str, list[dict]] = {}
    identical: dict[str, bool] = {}
    try:
        run(["sh", "-c", " && ".join(f"cat {f} >/dev/null" for f in files)], "warm", cwd=work)
        for r in range(args.rounds):
            for method in methods:
                steps = []
                trees = [("after", ROOT)] + ([("before", args.before)] if args.before else [])
                for tag, tree in (trees if r % 2 == 0 else trees[::-1]):
                    steps.append((f"mergebuild{' before' if tag == 'before' else ''} {method}", *mergebuild(work, files, method, tree, tag)))
                if args.mecha_python:
                    out = work / "mecha.safetensors"
                    steps.append((f"sd-mecha {method}", [args.mecha_python, str(HERE / "mecha_driver.py"), method, "cpu",
                                                         str(out), *map(str, files)], {**os.environ, "TQDM_DISABLE": "1"}, out))
                out = work / "plain.safetensors"
                steps.append((f"plain torch script {method}", [PY, "-c", PLAIN, method, str(out), *map(str, files)], None, out))
                for label, argv, env, out in steps:
                    row = run(argv, label, env, cwd=work)
                    rows.setdefault(label, []).append(row)
                    print(f"round {r + 1} {label:32} {row['seconds']:7.1f} s  {row['peak_rss_bytes'] / 2**30:5.2f} GiB",
                          flush=True)
                if r == 0 and args.before:
                    a, b = work / f"out-after-{method}.safetensors", work / f"out-before-{method}.safetensors"
                    identical[method] = tensor_digests(a) == tensor_digests(b)
                for f in work.glob("*.safetensors"):
                    f.unlink()
                for d in work.glob("cache-*"):
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, files, rows, identical)


def largest(args) -> None:
    """Peak RSS of TIES and DARE over one tensor of LARGEST's shape, against 1 GiB + 4 x its float32 size."""
    work = Path(tempfile.mkdtemp(prefix="mergebuild-largest-", dir=args.data))
    code = ("import sys, torch; from safetensors.torch import save_file; g = torch.Generator().manual_seed(0); "
            f"base = torch.randn({LARGEST}, generator=g) * 0.02; "
            "[save_file({'single_blocks.0.linear1.weight': (base + (i > 0) * 0.002 * torch.randn(base.shape, generator=g))"
            ".to(torch.bfloat16)}, p) for i, p in enumerate(sys.argv[1:])]")
    files = [work / f"{n}.safetensors" for n in "ABC"]
    bound = 2**30 + 4 * 4 * LARGEST[0] * LARGEST[1]
    try:
        subprocess.run([PY, "-c", code, *map(str, files)], check=True)
        trees = [("after", ROOT)] + ([("before", args.before)] if args.before else [])
        print(f"one {LARGEST[0]} x {LARGEST[1]} bf16 tensor, 3 models; bound 1 GiB + 4 x {4 * LARGEST[0] * LARGEST[1] / 2**20:.0f} MiB "
              f"= {bound / 2**30:.2f} GiB")
        table = []
        for method in args.methods.split(","):
            for tag, tree in trees:
                argv, env, out = mergebuild(work, files, method, tree, tag, dtype="bfloat16")
                row = run(argv, tag, env, cwd=work)
                out.unlink(missing_ok=True)
                label = f"mergebuild{' before' if tag == 'before' else ''} {method}"
                table.append({"step": label, "seconds": row["seconds"], "peak_rss_gib": row["peak_rss_bytes"] / 2**30,
                              "within_bound": row["peak_rss_bytes"] <= bound})
                print(f"{label:28} {row['seconds']:7.1f} s  peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB "
                      f"({'within' if row['peak_rss_bytes'] <= bound else 'OVER'} the bound)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = HERE / "results" / f"selection-largest-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps({"shape": LARGEST, "bound_gib": bound / 2**30, "rows": table}, indent=1))
    print(f"figures: {out.relative_to(ROOT)}")


def report(args, files, rows: dict, identical: dict) -> None:
    table = []
    for label, runs in rows.items():
        secs = [x["seconds"] for x in runs]
        table.append({"step": label, "best_s": min(secs), "median_s": statistics.median(secs), "runs_s": secs,
                      "peak_rss_gib": max(x["peak_rss_bytes"] for x in runs) / 2**30})
    best = {t["step"]: t["best_s"] for t in table}
    print(f"\ninputs: 3 x {files[0].stat().st_size / 1e9:.2f} GB fp16, density {DENSITY}; CPUs: {os.cpu_count()}; "
          f"load average at the end {os.getloadavg()[0]:.1f}; best of {args.rounds} interleaved rounds")
    print(f"{'step':34} {'best s':>7} {'median':>7} {'vs mb':>6} {'peak RSS':>9}")
    for t in table:
        method = t["step"].split()[-1]
        ours = best.get(f"mergebuild {method}")
        ratio = f"{t['best_s'] / ours:6.2f}" if ours else ""
        print(f"{t['step']:34} {t['best_s']:7.1f} {t['median_s']:7.1f} {ratio:>6} {t['peak_rss_gib']:6.2f} GiB")
    for method, same in identical.items():
        print(f"{method}: output tensors {'byte-identical to' if same else 'DIFFER from'} --before's")
    out = HERE / "results" / f"selection-{args.methods.replace(',', '-')}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"shrink": args.shrink, "rounds": args.rounds, "cpus": os.cpu_count(),
                               "python": platform.python_version(), "before": str(args.before or ""),
                               "input_bytes": files[0].stat().st_size, "rows": table,
                               "identical_to_before": identical}, indent=1))
    print(f"figures: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

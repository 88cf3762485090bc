"""Core benchmark: mergebuild against the I/O floor and a plain torch script, on SD1.5-sized checkpoints.

    python benchmarks/core.py               # full size (three ~2.1 GB fp16 checkpoints, several minutes)
    python benchmarks/core.py --shrink 16   # small, to check the script works
    python benchmarks/core.py --repeat 1    # one round only (default 3 rounds, medians reported)
    python benchmarks/core.py --compare 42e8e8b   # each round runs that commit and the working tree, interleaved

Steps (each one a subprocess, timed by wall clock; peak RSS from os.wait4's rusage of that child):
  (a) I/O floor: read both inputs fully, write one output of the same size, fsync
  (b) plain torch: safetensors load_file both, lerp in fp32 per tensor, cast to fp16, save_file (+ fsync)
  (c) mergebuild cold build (empty cache) of weighted_sum(A, B) -> fp16 output
  (d) mergebuild no-op rebuild of (c)
  (g) (c) again with an empty cache, the fingerprint store kept: another project, the same machine
  (e) mergebuild 3-step chain, cold; then the last step's alpha changed and rebuilt
  (f) the chain again after one block (IN07) of the last step's alpha changed
"Cold" is an empty cache and an empty per-user fingerprint store (a fresh MERGEBUILD_HOME), so
every source is hashed as on a machine that never saw it; (d), (e) rebuild and (f) keep both.

The parent process stays small (stdlib only) on purpose: a child's ru_maxrss can inherit the
parent's high-water mark across fork/exec. The page cache is warm: inputs are read once before the
first step (caches cannot be dropped here); `sync` runs, untimed, before every step.
The host's CPU speed varies a lot on shared VMs, so all steps run in R interleaved rounds and the
table gives the median, min and max of each; targets are judged on the best (min) of each step,
the floor's included, since a neighbour's load only ever adds time; peak RSS is the max.
Figures go to benchmarks/results/core-<date>.json. Misses are reported, never fatal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import selectors
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
# `python -m mergebuild`, not the console script: with --compare / --rev, PYTHONPATH puts another
# revision's code first, and the installed script names the entry point of this one (cli.run)
MERGEBUILD = [PY, "-m", "mergebuild"]
CHUNK = 64 << 20
MB = 1e6


# ------------------------------------------------------------------------------------------------
# steps that run inside a child process (`core.py _step NAME ...`)

def _child_fabricate(data: str, shrink: str) -> None:
    import torch

    from mergebuild.testing.fabricate import fabricate_family

    paths = fabricate_family(Path(data), "sd1-ldm", int(shrink), torch.float16,
                             names=("A", "B", "C"), prefix=f"sd15-x{shrink}-")
    for p in paths:
        print(p)


def _child_io_floor(a: str, b: str, out: str) -> None:
    """Read B fully, then read A chunk by chunk writing each chunk to OUT; fsync."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(b, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    with open(a, "rb", buffering=0) as src, open(out, "wb", buffering=0) as dst:
        while n := src.readinto(buf):
            done = 0
            while done < n:
                done += dst.write(view[done:n])
        os.fsync(dst.fileno())


def _child_torch(a: str, b: str, out: str, alpha: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    ta, tb = load_file(a), load_file(b)
    w = float(alpha)
    res = {}
    for k in list(ta):
        x = ta.pop(k)
        y = tb.pop(k)
        if x.is_floating_point():
            res[k] = torch.lerp(x.float(), y.float(), w).to(torch.float16)
        else:
            res[k] = x
        del x, y
    save_file(res, out, metadata={"format": "pt"})
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _child_compare(p: str, q: str) -> None:
    """Print how many tensors of two safetensors files differ (data only, metadata ignored)."""
    import torch
    from safetensors import safe_open

    differ = 0
    with safe_open(p, "pt") as f, safe_open(q, "pt") as g:
        keys = set(f.keys())
        assert keys == set(g.keys()), "key sets differ"
        for k in keys:
            if not torch.equal(f.get_tensor(k), g.get_tensor(k)):
                differ += 1
    print(json.dumps({"tensors": len(keys), "differ": differ}))


CHILD_STEPS = {"fabricate": _child_fabricate, "io_floor": _child_io_floor, "torch": _child_torch,
               "compare": _child_compare}


# ------------------------------------------------------------------------------------------------
# the parent: run and measure

def run(argv: list[str], label: str, env: dict | None = None) -> dict:
    """Run argv as a child; its wall time, peak RSS (from wait4) and stdout."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    # drain both pipes ourselves, then reap with wait4 (Popen.wait would discard the rusage)
    out_chunks, err_chunks = [], []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out_chunks)
    sel.register(proc.stderr, selectors.EVENT_READ, err_chunks)
    open_ = 2
    while open_:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 1 << 16)
            if chunk:
                key.data.append(chunk)
            else:
                sel.unregister(key.fileobj)
                open_ -= 1
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = b"".join(out_chunks).decode()
    stderr = b"".join(err_chunks).decode()
    if proc.returncode != 0:
        sys.stderr.write(stderr)
        raise SystemExit(f"step {label} failed (exit {proc.returncode}): {' '.join(argv)}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": stdout,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt}


def child(step: str, *args: str) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "_step", step, *args]


def mergebuild(mergefile: Path, cache: Path) -> list[str]:
    return [*MERGEBUILD, "-f", str(mergefile), "--cache-dir", str(cache), "--json", "-q"]


def mergefile_one(path: Path, a: Path, b: Path, out: Path) -> None:
    path.write_text(f"""[models.A]
path = "{a}"
[models.B]
path = "{b}"

[merges.merged]
method = "weighted_sum"
inputs = ["A", "B"]
alpha = 0.5
output = "{out}"
dtype = "float16"
""")


def mergefile_chain(path: Path, a: Path, b: Path, c: Path, out: Path, final_alpha) -> None:
    path.write_text(f"""[models.A]
path = "{a}"
[models.B]
path = "{b}"
[models.C]
path = "{c}"

[merges.mix1]
method = "weighted_sum"
inputs = ["A", "B"]
alpha = 0.4

[merges.mix2]
method = "add_difference"
inputs = ["mix1", "B", "C"]
alpha = 0.5

[merges.final]
method = "weighted_sum"
inputs = ["mix2", "A"]
alpha = {final_alpha}
output = "{out}"
dtype = "float16"
""")


def fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def warm(paths) -> None:
    buf = bytearray(CHUNK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def git(*args: str) -> str:
    """Read-only git calls (rev-parse, status, archive): nothing in the repository changes."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_digest(package: Path) -> str:
    """sha256 over the package's .py files: tells whether the code changed during the run."""
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def pinned_code(rev: str, data: Path) -> Path:
    """The package as committed at `rev`, extracted once (git archive) into the data folder."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not sha:
        raise SystemExit(f"--rev {rev}: not a commit here")
    target = data / f"code-{sha[:12]}"
    if not (target / "mergebuild" / "__init__.py").exists():
        archive = subprocess.run(["git", "archive", "--format=tar", sha, "mergebuild"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return target


def mb(n: float) -> str:
    return f"{n / MB:,.0f} MB"


ROWS = [("(a) I/O floor", "a"), ("(b) plain torch", "b"), ("(c) mergebuild cold", "c"),
        ("(d) no-op rebuild", "d"), ("(e) chain cold", "e_cold"), ("(e) chain alpha rebuild", "e_rebuild"),
        ("(f) chain one-block tweak", "f_block"), ("(g) known files, no cache", "g_known")]
LABELS = {
    "a": "I/O floor: read A+B, write one output, fsync",
    "b": "plain torch: load_file x2, lerp fp32, fp16, save_file, fsync",
    "c": "mergebuild cold: weighted_sum(A,B) -> fp16",
    "d": "mergebuild no-op rebuild of (c)",
    "e_cold": "mergebuild 3-step chain, cold",
    "e_rebuild": "chain rebuilt after the last step's alpha changed",
    "f_block": "chain rebuilt after one block (IN07) of the last step's alpha changed",
    "g_known": "(c) with an empty cache, the fingerprint store kept (files hashed before on this machine)",
}


def one_round(n: int, work: Path, a: Path, b: Path, c: Path, keep: bool, check: bool,
              env: dict | None = None) -> tuple[dict, dict | None]:
    """Every step once; {key: measurement}, and the (b) vs (c) check when asked for."""
    got: dict[str, dict] = {}
    cmp = None
    home = Path(tempfile.mkdtemp(prefix="mb-home-", dir=work))  # cold: an empty fingerprint store
    env = {**(env or os.environ), "MERGEBUILD_HOME": str(home)}

    def record(key: str, r: dict) -> None:
        got[key] = {k: r[k] for k in ("seconds", "peak_rss_bytes", "user_s", "sys_s", "minor_faults")}
        if r["stdout"].startswith("{"):
            got[key]["report"] = json.loads(r["stdout"])
        print(f"  round {n} {key:<9} {r['seconds']:8.2f} s  peak RSS {mb(r['peak_rss_bytes']):>9}  "
              f"(user {r['user_s']:5.1f} s, sys {r['sys_s']:5.1f} s)", flush=True)

    # (a) I/O floor
    out_a = work / "io-floor.bin"
    record("a", run(child("io_floor", str(a), str(b), str(out_a)), "a", env))
    fresh(out_a)
    # (b) plain torch
    out_b = work / "torch.safetensors"
    record("b", run(child("torch", str(a), str(b), str(out_b), "0.5"), "b", env))
    # (c) mergebuild cold, one step
    mf_one, out_c, cache_c = work / "one.toml", work / "out" / "one.safetensors", work / "cache-one"
    fresh(cache_c), fresh(out_c)
    mergefile_one(mf_one, a, b, out_c)
    record("c", run(mergebuild(mf_one, cache_c), "c", env))
    if check:  # same numbers as the plain torch script (not timed)
        cmp = json.loads(run(child("compare", str(out_b), str(out_c)), "compare", env)["stdout"])
    fresh(out_b)
    # (d) no-op rebuild
    record("d", run(mergebuild(mf_one, cache_c), "d", env))
    fresh(cache_c), fresh(out_c)
    record("g_known", run(mergebuild(mf_one, cache_c), "g_known", env))
    if not keep:
        fresh(cache_c), fresh(out_c)
    # (e) chain: cold, then the last alpha changed
    mf_chain, out_e, cache_e = work / "chain.toml", work / "out" / "chain.safetensors", work / "cache-chain"
    fresh(cache_e), fresh(out_e), fresh(home).mkdir()
    mergefile_chain(mf_chain, a, b, c, out_e, 0.25)
    record("e_cold", run(mergebuild(mf_chain, cache_e), "e_cold", env))
    mergefile_chain(mf_chain, a, b, c, out_e, 0.3)
    record("e_rebuild", run(mergebuild(mf_chain, cache_e), "e_rebuild", env))
    mergefile_chain(mf_chain, a, b, c, out_e, "{ default = 0.3, IN07 = 0.35 }")
    record("f_block", run(mergebuild(mf_chain, cache_e), "f_block", env))
    if not keep:
        fresh(cache_e), fresh(out_e)
    fresh(home)
    return got, cmp


def code_under_test(rev: str | None, data: Path) -> tuple[dict, dict | None, Path]:
    """What one run measures: the working tree, or `rev` extracted and put first on PYTHONPATH."""
    if rev:
        package_root = pinned_code(rev, data)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
        code = {"source": f"git archive {rev}", "commit": git("rev-parse", rev), "path": str(package_root)}
    else:
        package_root, env = ROOT, None
        code = {"source": "working tree", "commit": git("rev-parse", "HEAD"),
                "mergebuild_dirty": bool(git("status", "--porcelain", "mergebuild"))}
    code["digest_before"] = code_digest(package_root / "mergebuild")
    code["imported_from"] = subprocess.run([PY, "-c", "import mergebuild; print(mergebuild.__file__)"], env=env,
                                           cwd=HERE, capture_output=True, text=True).stdout.strip()
    print(f"mergebuild imported from {code['imported_from']}", flush=True)
    return code, env, package_root


def summarize(runs: dict[str, list[dict]]) -> dict:
    steps = {}
    for _, key in ROWS:
        secs = [m["seconds"] for m in runs[key]]
        steps[key] = {"label": LABELS[key], "median_s": statistics.median(secs), "min_s": min(secs),
                      "max_s": max(secs), "peak_rss_bytes": max(m["peak_rss_bytes"] for m in runs[key]),
                      "runs": runs[key]}
    return steps


def judge(steps: dict, floor: float) -> list[tuple[str, str, bool]]:
    """The speed issue's targets, on the best run of each step (the floor's best too)."""
    best = {k: v["min_s"] for k, v in steps.items()}
    c_rss = steps["c"]["peak_rss_bytes"]
    return [
        ("(c) <= 1.5x (a) (stretch 1.3x)", f"{best['c'] / floor:.2f}x", best["c"] <= 1.5 * floor),
        ("(c) faster than (b)", f"{best['c'] / best['b']:.2f}x of (b)", best["c"] < best["b"]),
        ("(d) < 0.3 s", f"{best['d']:.2f} s", best["d"] < 0.3),
        ("(f) one-block tweak <= 0.5x (e) cold", f"{best['f_block'] / best['e_cold']:.2f}x",
         best["f_block"] <= 0.5 * best["e_cold"]),
        ("(c) peak RSS <= 1 GB", mb(c_rss), c_rss <= 1e9),
    ]


def step_table(steps: dict, floor: float) -> list[str]:
    lines = [f"{'step':<26} {'median s':>9} {'min s':>8} {'max s':>8} {'min/(a)':>8} {'peak RSS':>10}"]
    for label, key in ROWS:
        s = steps[key]
        lines.append(f"{label:<26} {s['median_s']:>9.2f} {s['min_s']:>8.2f} {s['max_s']:>8.2f} "
                     f"{s['min_s'] / floor:>8.2f} {mb(s['peak_rss_bytes']):>10}")
    return lines


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_step":
        CHILD_STEPS[sys.argv[2]](*sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shrink", type=int, default=1, help="divide large dims by this (1 = full size)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of all steps, interleaved; medians are reported")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--keep", action="store_true", help="keep the last round's outputs and caches")
    p.add_argument("--rev", help="benchmark mergebuild as committed at this git revision (default: the "
                   "working tree); extracted with git archive, put first on PYTHONPATH")
    p.add_argument("--compare", metavar="REV", help="also run REV in every round, interleaved with the code "
                   "measured (before/after on the same machine, the same minutes)")
    args = p.parse_args()

    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    work = data / f"run-x{args.shrink}"
    fresh(work).mkdir(parents=True)

    # 1. inputs --------------------------------------------------------------------------------
    names = [data / f"sd15-x{args.shrink}-{n}.safetensors" for n in "ABC"]
    if not all(n.exists() for n in names):
        print(f"fabricating {len(names)} checkpoints (shrink {args.shrink}) into {data} ...", flush=True)
        r = run(child("fabricate", str(data), str(args.shrink)), "fabricate")
        print(f"  done in {r['seconds']:.1f} s, peak RSS {mb(r['peak_rss_bytes'])}", flush=True)
    a, b, c = names
    size = a.stat().st_size
    print(f"inputs: 3 x {mb(size)} ({a.parent})", flush=True)
    warm(names)

    # 2. rounds ----------------------------------------------------------------------------------
    codes = [code_under_test(args.rev, data)]
    if args.compare:
        codes.insert(0, code_under_test(args.compare, data))
    runs = [{key: [] for _, key in ROWS} for _ in codes]
    cmp = None
    for n in range(1, args.repeat + 1):
        keep = args.keep and n == args.repeat
        order = list(range(len(codes))) if n % 2 else list(reversed(range(len(codes))))  # alternate who goes first
        for i in order:
            if len(codes) > 1:
                print(f"round {n}: {codes[i][0]['source']}", flush=True)
            got, check = one_round(n, work, a, b, c, keep, check=n == 1, env=codes[i][1])
            cmp = check or cmp
            for key, m in got.items():
                runs[i][key].append(m)
    if not args.keep:
        fresh(work)
    for code, _, package_root in codes:
        code["digest_after"] = code_digest(package_root / "mergebuild")

    # 3. table and targets -----------------------------------------------------------------------
    measured = [summarize(r) for r in runs]
    floor = min(m["a"]["min_s"] for m in measured)  # the floor's best run, over every round
    lines = [
        f"mergebuild core benchmark, shrink {args.shrink}: inputs 3 x {mb(size)} fp16, "
        f"{os.cpu_count()} CPUs, {args.repeat} interleaved rounds; ratios are best run / best floor ({floor:.2f} s)",
        "NOTE: page cache WARM (inputs read before the first step; caches cannot be dropped here); "
        "sync before each step, untimed; cold = empty cache and empty fingerprint store (MERGEBUILD_HOME)",
    ]
    targets = []
    for (code, _, _), steps in zip(codes, measured):
        lines += ["", f"code: {code['source']} at {code['commit'][:10]}"
                  f"{' + uncommitted changes in mergebuild/' if code.get('mergebuild_dirty') else ''}, digest "
                  f"{code['digest_before']}" + ("" if code["digest_before"] == code["digest_after"] else
                                                f"  WARNING: mergebuild/ changed during the run (now {code['digest_after']})")]
        lines += step_table(steps, floor)
        targets = judge(steps, floor)
        lines += [f"{'PASS' if ok else 'MISS'}  {name:<38} {value}" for name, value, ok in targets]
    lines.append("")
    if cmp is not None:
        lines.append(f"check: (b) and (c) outputs: {cmp['differ']} of {cmp['tensors']} tensors differ")
    print("\n" + "\n".join(lines))

    code = codes[-1][0]
    args.results.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now()
    stem = f"core-{now:%Y-%m-%d}-{code['commit'][:7]}{'-dirty' if code.get('mergebuild_dirty') else ''}"
    stem += '' if args.shrink == 1 else f'-x{args.shrink}'
    stem += f"-vs-{codes[0][0]['commit'][:7]}" if args.compare else ""
    path = args.results / f"{stem}.json"  # one file per day and commit: earlier results stay
    doc = {
        "date": now.isoformat(timespec="seconds"),
        "shrink": args.shrink,
        "repeat": args.repeat,
        "input_bytes": size,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "code": code,
        "page_cache": "warm",
        "floor_best_s": floor,
        "steps": measured[-1],
        "ratios_to_io_floor": {k: v["min_s"] / floor for k, v in measured[-1].items()},
        "targets": {name: {"value": value, "pass": ok} for name, value, ok in targets},
        "check_b_vs_c": cmp,
        "table": lines,
    }
    if args.compare:
        doc["compared"] = {"code": codes[0][0], "steps": measured[0],
                           "ratios_to_io_floor": {k: v["min_s"] / floor for k, v in measured[0].items()}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

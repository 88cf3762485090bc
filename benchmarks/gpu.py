"""GPU executor benchmark (issue: GPU executor): one run, one table, CPU and GPU side by side.

    python benchmarks/gpu.py                 # full-size SD1.5 fp16 inputs (2.1 GB each)
    python benchmarks/gpu.py --shrink 16     # a quick check of the script itself

Rows: the I/O floor (read the inputs, write one output), then weighted_sum (2 models), TIES and
DARE (3 models), LoRA extract (rank 64), each built by mergebuild with a fresh cache on every
device present, plus a plain per-tensor formula script on the CPU for TIES and DARE (the
baseline the GPU must beat by 10x). Seconds, ratio to the I/O floor, GPU memory peak. The page
cache is warm (the inputs are read once before timing).

Peer rows: sd-mecha 1.1.8 weighted_sum and TIES (same inputs, alpha 0.5 / k 0.2) on every device
present, load + merge + save timed inside benchmarks/mecha_driver.py, which runs in sd-mecha's own
interpreter (sd-mecha is no dependency of mergebuild): --mecha-python, by default
benchmarks/data/mecha-venv/bin/python if it exists, else this interpreter if it can import
sd_mecha, else the rows are skipped with a note. Where nothing can be downloaded (a GPU machine):
    python -m pip install --no-index --find-links .whl sd-mecha
into the interpreter that already has torch; see mecha_driver.py for how its TIES differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mergebuild.project import BuildOptions, build  # noqa: E402
from mergebuild.testing.fabricate import fabricate_family  # noqa: E402

MERGES = {
    "weighted_sum": ('method = "weighted_sum"', ["a", "b"], 'alpha = 0.5'),
    "ties": ('method = "ties"', ["base", "a", "b"], "density = 0.2"),
    "dare": ('method = "dare"', ["base", "a", "b"], "density = 0.2\nseed = 1"),
    "lora_extract": ('method = "lora_extract"', ["a", "base"], "rank = 64"),
}


def io_floor(inputs: list[Path], out: Path) -> float:
    start = time.perf_counter()
    for p in inputs:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    with open(inputs[0], "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 64 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    return time.perf_counter() - start


def run_mergebuild(work: Path, paths: dict, method: str, device: str) -> tuple[float, int]:
    head, inputs, params = MERGES[method]
    out = "out.safetensors" if method != "lora_extract" else "lora.safetensors"
    text = "".join(f'[models.{n}]\npath = "{paths[n]}"\n' for n in ("base", "a", "b"))
    text += f'[merges.m]\n{head}\ninputs = {inputs}\n{params}\noutput = "{work / out}"\n'
    (work / "mergefile.toml").write_text(text)
    cache = work / f"cache-{method}-{device}"
    shutil.rmtree(cache, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    build(BuildOptions(mergefile=work / "mergefile.toml", cache_dir=cache, device=device))
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    shutil.rmtree(cache, ignore_errors=True)
    return seconds, peak


def plain_script(paths: dict, method: str, out: Path) -> float:
    """The formula, tensor by tensor, on the CPU, as a user's script would do it."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    result = {}
    with safe_open(paths["base"], "pt") as fb, safe_open(paths["a"], "pt") as fa, safe_open(paths["b"], "pt") as fc:
        for key in fb.keys():
            base = fb.get_tensor(key)
            if not base.is_floating_point():
                result[key] = base
                continue
            b32 = base.float()
            deltas = torch.stack([fa.get_tensor(key).float() - b32, fc.get_tensor(key).float() - b32])
            if method == "ties":
                k = max(1, int(0.2 * base.numel()))
                flat = deltas.reshape(2, -1)
                threshold = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
                flat = torch.where(flat.abs() >= threshold, flat, 0)
                sign = torch.sign(flat.sum(0))
                agree = (torch.sign(flat) == sign) & (flat != 0)
                merged = (flat * agree).sum(0) / agree.sum(0).clamp(min=1)
                result[key] = (b32 + merged.reshape(base.shape)).to(base.dtype)
            else:
                keep = torch.rand(deltas.shape, generator=g) < 0.2
                result[key] = (b32 + (deltas * keep / 0.2).sum(0)).to(base.dtype)
    save_file(result, str(out))
    return time.perf_counter() - start


MECHA_METHODS = {"weighted_sum": ["a", "b"], "ties": ["base", "a", "b"]}  # as mecha_driver.py takes them


def find_mecha_python(given: str | None) -> str | None:
    """The interpreter to run sd-mecha with (see the module docstring), or None to skip its rows."""
    if given:
        return given
    venv = HERE / "data" / "mecha-venv" / "bin" / "python"
    if venv.exists():
        return str(venv)
    if importlib.util.find_spec("sd_mecha") is not None:
        return sys.executable
    return None


def run_mecha(python: str, paths: dict, method: str, device: str, out: Path) -> tuple[float, int] | None:
    """One sd-mecha merge in a subprocess; (seconds, GPU peak) as the driver measured them, or
    None (with a printed note) if it failed."""
    cmd = [python, str(HERE / "mecha_driver.py"), method, device, str(out), *(str(paths[n]) for n in MECHA_METHODS[method])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    out.unlink(missing_ok=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        print(f"note: sd-mecha {method} [{device}] failed (exit {proc.returncode}); row left out:\n    {tail}")
        return None
    result = json.loads(lines[-1])
    return result["seconds"], result["peak"]


def targets(seconds: dict[str, float], floor: float) -> list[str]:
    """The issue's targets, judged on the GPU rows present: weighted_sum within 1.3x the floor;
    TIES and DARE within 2x it, 10x faster than the plain CPU script, 5x faster than sd-mecha."""
    lines = []

    def judge(name: str, ok: bool, figure: str) -> None:
        lines.append(f"target {name}: {'PASS' if ok else 'MISS'} ({figure})")

    ws = seconds.get("mergebuild weighted_sum [cuda]")
    if ws is not None:
        judge("weighted_sum [cuda] <= 1.3x floor", ws <= 1.3 * floor, f"{ws / floor:.2f}x")
    for method in ("ties", "dare"):
        gpu = seconds.get(f"mergebuild {method} [cuda]")
        if gpu is None:
            continue
        judge(f"{method} [cuda] <= 2x floor", gpu <= 2 * floor, f"{gpu / floor:.2f}x")
        plain = seconds.get(f"plain torch script {method} [cpu]")
        if plain is not None:
            judge(f"{method} [cuda] >= 10x the plain CPU script", plain >= 10 * gpu, f"{plain / gpu:.1f}x")
    for method in MECHA_METHODS:
        ours, peer = seconds.get(f"mergebuild {method} [cuda]"), seconds.get(f"sd-mecha {method} [cuda]")
        if ours is not None and peer is not None:
            judge(f"{method} [cuda] >= 5x sd-mecha [cuda]", peer >= 5 * ours, f"{peer / ours:.1f}x")
    return lines or ["targets: judged on CUDA rows only; none here"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shrink", type=int, default=1)
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--methods", default=",".join(MERGES))
    p.add_argument("--json", type=Path, help="also write the rows and verdicts to this file")
    p.add_argument("--mecha-python", help="Python with sd_mecha installed, for the sd-mecha rows (default: "
                   "benchmarks/data/mecha-venv/bin/python if present, else this interpreter if it has sd_mecha)")
    args = p.parse_args()
    mecha_python = find_mecha_python(args.mecha_python)
    if mecha_python is None:
        print("note: no sd-mecha found (no benchmarks/data/mecha-venv, none in this interpreter, no --mecha-python): "
              "sd-mecha rows skipped")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    names = ("base", "a", "b")
    files = fabricate_family(args.data, "sd1-ldm", args.shrink, torch.float16, names=names, prefix=f"gpu-x{args.shrink}-")
    paths = dict(zip(names, files))
    work = Path(tempfile.mkdtemp(prefix="mergebuild-gpu-", dir=args.data))
    try:
        io_floor(list(files), work / "warm.bin")  # warm the page cache
        floor = io_floor(list(files[:2]), work / "floor.bin")
        rows = [("I/O floor (read 2 inputs, write 1)", floor, 0)]
        for method in args.methods.split(","):
            for device in devices:
                seconds, peak = run_mergebuild(work, paths, method, device)
                rows.append((f"mergebuild {method} [{device}]", seconds, peak))
            if mecha_python and method in MECHA_METHODS:
                for device in devices:
                    result = run_mecha(mecha_python, paths, method, device, work / "mecha.safetensors")
                    if result is not None:
                        rows.append((f"sd-mecha {method} [{device}]", *result))
            if method in ("ties", "dare"):
                rows.append((f"plain torch script {method} [cpu]", plain_script(paths, method, work / "plain.safetensors"), 0))
        gpu = torch.cuda.get_device_name() if devices[-1] == "cuda" else "none"
        print(f"\ninputs: {files[0].stat().st_size / 1e9:.2f} GB each, fp16; CPUs: {os.cpu_count()}; GPU: {gpu}; page cache warm")
        print(f"{'step':44} {'seconds':>9} {'x floor':>8} {'GPU peak':>10}")
        for label, seconds, peak in rows:
            mem = f"{peak / 1e9:.2f} GB" if peak else ""
            print(f"{label:44} {seconds:9.2f} {seconds / floor:8.2f} {mem:>10}")
        verdicts = targets({label: seconds for label, seconds, _ in rows}, floor)
        for line in verdicts:
            print(line)
        if args.json:
            args.json.write_text(json.dumps({
                "shrink": args.shrink, "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
                "input_bytes": files[0].stat().st_size, "floor": floor,
                "rows": [{"step": label, "seconds": seconds, "gpu_peak": peak} for label, seconds, peak in rows],
                "targets": verdicts,
            }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Flux.1 at full width: a block-weighted merge of two transformer files, cold and after one
block changes, against the I/O floor measured in the same run, with peak RSS.

    python benchmarks/flux.py              # half depth (10 double + 19 single blocks, ~12 GB each)
    python benchmarks/flux.py --depth full # 19 + 38 blocks, ~23.8 GB each (needs ~100 GB free)

The pair is fabricated from the Flux layout (bf16, BFL names without prefix, as transformer-only
files are distributed) tensor by tensor, streaming, since two whole models do not fit in RAM:
B = A + noise. Steps, each a process of its own (wall time, peak RSS from wait4):
  (a) the I/O floor: read A and B, write one output of A's size, fsync
  (b) mergebuild cold (empty cache and fingerprint store): weighted_sum(A, B), alpha = { default = 0.5, D05 = 0.3 } -> bf16 output
  (c) mergebuild after D05 changes (0.3 -> 0.4): only D05's tensors recompute
  (d) mergebuild cold TIES (whole-tensor: a top-k per tensor), density 0.2, base A
Results go to benchmarks/results/flux-<depth>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from core import MERGEBUILD, PY, ROOT, child, fresh, git, run  # noqa: E402

MB = 1e6
DEPTHS = {"half": (10, 19), "full": (19, 38)}


def flux_keys(double: int, single: int) -> dict[str, tuple[list[int], str]]:
    """The transformer's keys (no prefix) with their full shapes, cut to `double` + `single` blocks."""
    sys.path.insert(0, str(ROOT))
    from mergebuild.layouts import load_layout

    prefix = "model.diffusion_model."
    keys = {}
    for key, info in load_layout("flux-flux")["keys"].items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        parts = name.split(".")
        if parts[0] == "double_blocks" and int(parts[1]) >= double:
            continue
        if parts[0] == "single_blocks" and int(parts[1]) >= single:
            continue
        keys[name] = (info["shape"], "BF16")
    return keys


def _child_fabricate(data: str, depth: str) -> None:
    """Write A and B side by side, one tensor at a time (header first: the shapes are known)."""
    import torch

    keys = flux_keys(*DEPTHS[depth])
    header, offset = {}, 0
    for name, (shape, dtype) in keys.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    paths = [Path(data) / f"flux-{depth}-{n}.safetensors" for n in "AB"]
    files = [open(p, "wb") for p in paths]
    # randn for 12 B values would take most of an hour on 2 cores: tensors are cut from one
    # random pool at varying offsets instead (values only need to look like weights)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 27, generator=g)
    for f in files:
        f.write(struct.pack("<Q", len(blob)) + blob)
    for i, (name, (shape, _)) in enumerate(keys.items()):
        n = math.prod(shape)
        a = _cut(pool, n, i * 7919) * 0.05
        b = a + _cut(pool, n, i * 104729 + 12345) * 0.01
        for f, t in zip(files, (a, b)):
            f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
        del a, b
    for f, p in zip(files, paths):
        f.close()
        print(p)


def _cut(pool, n: int, start: int):
    """n values of the pool from `start` on, wrapping around."""
    import torch

    start %= pool.numel()
    if start + n <= pool.numel():
        return pool[start:start + n]
    reps = (start + n) // pool.numel() + 1
    return pool.repeat(reps)[start:start + n] if reps <= 2 else torch.cat([pool] * reps)[start:start + n]


def _child_floor(a: str, b: str, out: str) -> None:
    from core import _child_io_floor

    _child_io_floor(a, b, out)


def mergefile(path: Path, a: Path, b: Path, out: Path, method: str, d05: float) -> None:
    params = f"alpha = {{ default = 0.5, D05 = {d05} }}" if method == "weighted_sum" else "density = 0.2"
    inputs = '["A", "B"]'  # TIES: base A, one fine-tune B
    path.write_text(f"""[models.A]
path = "{a}"
[models.B]
path = "{b}"
[merges.m]
method = "{method}"
inputs = {inputs}
{params}
output = "{out}"
""")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_step":
        {"fabricate": _child_fabricate, "floor": _child_floor}[sys.argv[2]](*sys.argv[3:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", choices=DEPTHS, default="half")
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--no-ties", action="store_true", help="skip the TIES row")
    args = p.parse_args()
    data = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    a, b = (data / f"flux-{args.depth}-{n}.safetensors" for n in "AB")
    if not (a.exists() and b.exists()):
        print(f"fabricating two {args.depth}-depth Flux transformers (bf16) into {data} ...", flush=True)
        r = run([PY, __file__, "_step", "fabricate", str(data), args.depth], "fabricate")
        print(f"  {r['seconds']:.0f} s", flush=True)
    size = a.stat().st_size
    free = shutil.disk_usage(data).free
    print(f"inputs: 2 x {size / MB:,.0f} MB; free disk {free / MB:,.0f} MB", flush=True)
    work = fresh(data / f"flux-{args.depth}-work")
    work.mkdir()
    mf, out, cache, home = work / "mergefile.toml", work / "out" / "m.safetensors", work / "cache", work / "home"
    base = [*MERGEBUILD, "-f", str(mf), "--cache-dir", str(cache), "--json", "-q"]
    rows = {}

    def row(label: str, r: dict, extra: dict | None = None) -> None:
        rows[label] = {"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"], **(extra or {})}
        print(f"  {label:<22} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_bytes'] / MB:8,.0f} MB", flush=True)

    floor_out = work / "floor.bin"
    row("(a) I/O floor", run([PY, __file__, "_step", "floor", str(a), str(b), str(floor_out)], "floor"))
    floor_out.unlink()

    def build(label: str, method: str, d05: float, cold: bool) -> None:
        mergefile(mf, a, b, out, method, d05)
        if cold:  # an empty fingerprint store too: the sources are hashed as on a new machine
            fresh(home)
        r = run(base, label, {**os.environ, "MERGEBUILD_HOME": str(home)})
        doc = json.loads(r["stdout"]) if r["stdout"].startswith("{") else {}
        merge = doc["merges"]["m"]
        row(label, r, {"computed": merge["computed"], "tensors": merge["tensors"]})

    build("(b) weighted sum cold", "weighted_sum", 0.3, cold=True)
    build("(c) D05 changed", "weighted_sum", 0.4, cold=False)
    if not args.no_ties:
        shutil.rmtree(cache)
        out.unlink()
        build("(d) TIES cold", "ties", 0.3, cold=True)
    floor = rows["(a) I/O floor"]["seconds"]
    summary = {label: round(r["seconds"] / floor, 2) for label, r in rows.items()}
    largest = max(math.prod(shape) for shape, _ in flux_keys(*DEPTHS[args.depth]).values())
    doc = {"date": dt.date.today().isoformat(), "commit": git("rev-parse", "HEAD"), "depth": args.depth,
           "blocks": DEPTHS[args.depth], "input_bytes": size, "rows": rows, "ratio_to_floor": summary,
           "largest_tensor_fp32_bytes": largest * 4, "cpu_count": os.cpu_count()}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"flux-{args.depth}-{doc['date']}-{doc['commit'][:10]}.json"
    path.write_text(json.dumps(doc, indent=1))
    print("ratios to the floor:", json.dumps(summary), f"\nwrote {path}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

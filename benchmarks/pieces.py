"""Peak memory of an elementwise merge over one LLM-sized tensor (execute/pieces.py).

    python benchmarks/pieces.py --before /tmp/mb-before   # a checkout of the commit to compare with

Two bf16 files, each one tensor of Llama-3's embedding shape (128256 x 4096: 1.05 GB in bf16),
merged by weighted_sum into a bf16 output, cold (a fresh cache and MERGEBUILD_HOME). Rows, each a
process of its own (wall time, peak RSS from wait4), in interleaved rounds:
  mergebuild                the working tree (big tensors of elementwise methods move in pieces)
  mergebuild before         the same with PYTHONPATH at --before
  plain torch script        load_file both, torch.lerp in float32, save_file
The issue's bound for an elementwise method is 1 GB whatever the model size. The outputs of the
mergebuild rows are compared byte for byte (the sha256 of the tensor's bytes). Figures go to
benchmarks/results/pieces-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from selection import PY, run  # noqa: E402

SHAPE = (128256, 4096)
NAME = "model.embed_tokens.weight"
MERGEFILE = """[settings]
cache = "{cache}"
[models.a]
path = "{a}"
[models.b]
path = "{b}"
[merges.m]
method = "weighted_sum"
inputs = ["a", "b"]
alpha = 0.3
output = "{out}"
dtype = "bfloat16"
"""
PLAIN = """import sys, torch
from safetensors.torch import load_file, save_file
a, b = (load_file(p) for p in sys.argv[1:3])
save_file({k: torch.lerp(a[k].float(), b[k].float(), 0.3).bfloat16() for k in a}, sys.argv[3])
"""


def data_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + size)
        h = hashlib.sha256()
        while chunk := f.read(64 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--data", type=Path, default=HERE / "data")
    args = p.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mergebuild-pieces-", dir=args.data))
    files = [work / "a.safetensors", work / "b.safetensors"]
    code = ("import sys, torch; from safetensors.torch import save_file; g = torch.Generator().manual_seed(0); "
            f"base = (torch.randn({SHAPE}, generator=g) * 0.02).bfloat16(); "
            f"save_file({{{NAME!r}: base}}, sys.argv[1]); "
            f"save_file({{{NAME!r}: (base.float() + 0.002 * torch.randn(base.shape, generator=g)).bfloat16()}}, sys.argv[2])")
    trees = [("after", ROOT)] + ([("before", args.before)] if args.before else [])
    rows: dict[str, list] = {}
    hashes = {}
    try:
        subprocess.run([PY, "-c", code, *map(str, files)], check=True)
        print(f"one {SHAPE[0]} x {SHAPE[1]} bf16 tensor per file ({files[0].stat().st_size / 1e9:.2f} GB), "
              f"weighted_sum of 2", flush=True)
        for n in range(args.rounds):
            steps = trees + [("plain", None)]
            for tag, tree in steps if n % 2 == 0 else reversed(steps):
                out = work / f"out-{tag}.safetensors"
                if tree is None:
                    (work / "plain.py").write_text(PLAIN)
                    row = run([PY, str(work / "plain.py"), *map(str, files), str(out)], tag, cwd=work)
                    label = "plain torch script"
                else:
                    cache = work / f"cache-{tag}"
                    shutil.rmtree(cache, ignore_errors=True)
                    mf = work / f"{tag}.toml"
                    mf.write_text(MERGEFILE.format(cache=cache, a=files[0], b=files[1], out=out))
                    env = {**os.environ, "PYTHONPATH": str(tree), "MERGEBUILD_HOME": tempfile.mkdtemp(dir=work)}
                    row = run([PY, "-m", "mergebuild", "-f", str(mf), "--device", "cpu", "-q"], tag, env, cwd=work)
                    label = "mergebuild" + (" before" if tag == "before" else "")
                hashes[label] = data_sha256(out)
                out.unlink()
                rows.setdefault(label, []).append(row)
                print(f"  round {n + 1} {label:20} {row['seconds']:6.1f} s  peak RSS {row['peak_rss_bytes'] / 1e9:5.2f} GB",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    identical = len({hashes[k] for k in hashes if k.startswith("mergebuild")}) == 1
    print(f"mergebuild outputs identical: {identical}")
    doc = {"date": dt.date.today().isoformat(), "shape": SHAPE, "bound_bytes": 10**9, "identical": identical,
           "rows": {k: [{"seconds": r["seconds"], "peak_rss_bytes": r["peak_rss_bytes"]} for r in v] for k, v in rows.items()}}
    out = HERE / "results" / f"pieces-{doc['date']}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"figures: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Remote cache benchmark: a second machine, simulated by a second local cache, builds what a first
machine already built, through the shared remote (a file:// folder, and an S3 endpoint on loopback).

    python benchmarks/remote.py               # SD1.5-shaped, large dims / 4 (three ~140 MB fp16 models)
    python benchmarks/remote.py --shrink 1    # full size (three ~2.1 GB checkpoints)
    python benchmarks/remote.py --repeat 1    # one round (default 3, medians reported)

The Mergefile: mid = add_difference(A, B, C), final = weighted_sum(mid, B) -> output. Per remote
and round, each step a CLI subprocess timed by wall clock, in a fresh local cache:
  (a) cold, no remote (--remote-cache=off): the baseline
  (b) machine 1, cold, with the remote (computes everything, uploads it)
  (c) machine 2, cold local cache, the same remote: computes nothing, fetches the target's tensors
  (d) machine 2 again, a no-op (the output kept): what the remote costs an up-to-date build
Bytes moved come from each build's --json `tiers`. Every output's sha256 must equal (a)'s.
The S3 endpoint is moto's server on 127.0.0.1 in this process: no real network, so the figures
are the protocol's and the verification's costs, not a link's. Figures go to
benchmarks/results/remote-<remotes>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
MB = 1e6


def fabricate(data: Path, shrink: int) -> list[Path]:
    code = ("import sys, torch; from pathlib import Path; from mergebuild.testing.fabricate import fabricate_family; "
            f"print('\\n'.join(str(p) for p in fabricate_family(Path({str(data)!r}), 'sd1-ldm', {shrink}, "
            f"torch.float16, names=('A', 'B', 'C'), prefix='sd15-x{shrink}-')))")
    out = subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return [Path(line) for line in out.split()]


def mergefile(folder: Path, models: list[Path], url: str | None, options: str = "") -> None:
    remote = f'remote_cache = "{url}"\n{options}\n' if url else ""
    a, b, c = models
    (folder / "mergefile.toml").write_text(f"""[settings]
{remote}
[models.A]
path = "{a}"
[models.B]
path = "{b}"
[models.C]
path = "{c}"
[merges.mid]
method = "add_difference"
inputs = ["A", "B", "C"]
alpha = 0.7
[merges.final]
method = "weighted_sum"
inputs = ["mid", "B"]
alpha = 0.3
output = "out/final.safetensors"
""")


def build(folder: Path, cache: Path, env: dict, *flags, keep: bool = False) -> dict:
    subprocess.run(["sync"], check=False)
    start = time.perf_counter()
    proc = subprocess.run([PY, "-m", "mergebuild", "--json", "-q", "--cache-dir", str(cache), *flags], cwd=folder,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"build failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    doc = json.loads(proc.stdout)
    output = folder / "out" / "final.safetensors"
    sha = hashlib.sha256(output.read_bytes()).hexdigest()
    if not keep:
        output.unlink()
    remote = doc.get("tiers", {}).get("remote", {})
    return {"seconds": seconds, "computed": sum(m["computed"] for m in doc["merges"].values()), "sha256": sha,
            "bytes_down": remote.get("bytes_down", 0), "bytes_up": remote.get("bytes_up", 0),
            "blobs_down": remote.get("blobs_down", 0), "warnings": doc.get("warnings", []),
            "requests_hint": remote.get("hits", 0) + remote.get("misses", 0)}


def one_round(work: Path, models: list[Path], url: str, env: dict, options: str, reset) -> dict:
    for name in ("c-base", "c-m1", "c-m2", "out"):  # an output left over would be current already
        shutil.rmtree(work / name, ignore_errors=True)
    reset()
    mergefile(work, models, url, options)
    steps = {"cold_local": build(work, work / "c-base", env, "--remote-cache=off"),
             "machine1_cold_upload": build(work, work / "c-m1", env),
             "machine2_from_remote": build(work, work / "c-m2", env, keep=True),
             "machine2_noop": build(work, work / "c-m2", env)}
    return steps


def summarize(rounds: list[dict], output_bytes: int) -> dict:
    out = {}
    for step in rounds[0]:
        times = [r[step]["seconds"] for r in rounds]
        last = rounds[-1][step]
        out[step] = {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                     "max_s": round(max(times), 3), "computed": last["computed"], "bytes_down": last["bytes_down"],
                     "bytes_up": last["bytes_up"], "tensors_down": last["blobs_down"],
                     "warnings": last["warnings"]}
    base = out["cold_local"]["median_s"]
    for step in out:
        out[step]["vs_cold_local"] = round(out[step]["median_s"] / base, 3)
    out["machine2_from_remote"]["bytes_down_vs_output"] = round(out["machine2_from_remote"]["bytes_down"] /
                                                                output_bytes, 3)
    out["machine1_cold_upload"]["bytes_up_vs_output"] = round(out["machine1_cold_upload"]["bytes_up"] /
                                                              output_bytes, 3)
    shas = {r[s]["sha256"] for r in rounds for s in r}
    out["identical_outputs"] = len(shas) == 1
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shrink", type=int, default=4, help="divide large dims by this (1 = full size)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/mergebuild-bench-remote"))
    p.add_argument("--remotes", default="file,s3", help="which remotes: file, s3 or both")
    args = p.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    models = fabricate(work / "models", args.shrink)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGEBUILD_")}
    env.update(NO_COLOR="1", PYTHONPATH=str(ROOT))
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "shrink": args.shrink,
               "repeat": args.repeat, "cpus": os.cpu_count(), "models_bytes": [m.stat().st_size for m in models]}
    output_bytes = models[0].stat().st_size  # the output has A's keys and dtypes
    if "file" in args.remotes:
        folder = work / "shared"
        rounds = [one_round(work, models, f"file://{folder}", env, "", lambda: shutil.rmtree(folder, ignore_errors=True))
                  for _ in range(args.repeat)]
        results["file"] = summarize(rounds, output_bytes)
    if "s3" in args.remotes:
        from moto.server import ThreadedMotoServer
        import s3fs

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3env = dict(env, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                     AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")
        fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint, skip_instance_cache=True)
        buckets = iter(range(10**6))
        state = {}

        def fresh_bucket():
            state["bucket"] = f"bench-{next(buckets)}"
            fs.mkdir(state["bucket"])

        try:
            rounds = []
            for _ in range(args.repeat):
                fresh_bucket()
                rounds.append(one_round(work, models, f"s3://{state['bucket']}/cache", s3env, "", lambda: None))
            results["s3_moto_loopback"] = summarize(rounds, output_bytes)
        finally:
            server.stop()
    (HERE / "results").mkdir(exist_ok=True)
    tag = "-".join(r for r in ("file", "s3") if r in args.remotes)
    path = HERE / "results" / f"remote-{tag}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"\nwrote {path}")


def print_table(results: dict) -> None:
    for remote in ("file", "s3_moto_loopback"):
        if remote not in results:
            continue
        r = results[remote]
        print(f"\n{remote}: identical outputs {r['identical_outputs']}")
        print(f"  {'step':24} {'median s':>9} {'x cold':>7} {'computed':>9} {'MB down':>8} {'MB up':>8}")
        for step, v in r.items():
            if isinstance(v, dict):
                print(f"  {step:24} {v['median_s']:9.2f} {v['vs_cold_local']:7.2f} {v['computed']:9d} "
                      f"{v['bytes_down'] / MB:8.1f} {v['bytes_up'] / MB:8.1f}")


if __name__ == "__main__":
    main()

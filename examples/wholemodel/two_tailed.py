"""Two-tailed averaging (Melis 2022) of a noisy training run's checkpoints, against the last
checkpoint and fixed-length tails.

    .venv/bin/python examples/wholemodel/two_tailed.py          # 3 runs: table (+ results.json)
    .venv/bin/python examples/wholemodel/two_tailed.py --fast   # 1 run (what the test runs)

Data: scikit-learn's bundled digits (sklearn.datasets.load_digits, nothing is downloaded): the
test digits (30%) only for the table; of the training digits, 80% train and 20% validate (the
scorer's, tail_score.py). A run: an MLP 64-64-64-10 trained with Adam at a high learning rate
(1e-2, batches of 16), so its weights keep jumping around; the weights after each of its 24
epochs are a checkpoint (mergebuild/testing/digits.py). The Mergefile the script writes holds
`tail_average` over the 24 checkpoints with `k = "auto"` (scored by the validation
cross-entropy, direction minimize) and with fixed k = 1 (the last checkpoint), 4, 8 and 0 (all);
one run of the real `mergebuild` CLI builds them all.
Everything lands in --work (default examples/wholemodel/work/two_tailed/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mergebuild.testing import digits  # noqa: E402

HERE = Path(__file__).resolve().parent
# tensors this small gain nothing from torch's threads, and busy cores lose much to them
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
sys.path.insert(0, str(HERE))
import tail_score  # noqa: E402

SEEDS = [0, 1, 2]
EPOCHS = 24
FIXED = (1, 4, 8, 0)  # k = 1: the last checkpoint; 0: all of them


def train(work: Path, seed: int) -> list[str]:
    """The run's checkpoints, oldest first (skipped when saved: training is deterministic)."""
    names = [f"run{seed}_e{e:02d}" for e in range(EPOCHS)]
    paths = [work / "models" / f"{n}.safetensors" for n in names]
    if not all(p.exists() for p in paths):
        train_part, _ = tail_score.validation_split()
        series: list = []
        digits.train_mlp(train_part, hidden=(64, 64, 64), seed=seed, epochs=EPOCHS, lr=1e-2, batch_size=16,
                         checkpoints=series)
        for state, path in zip(series, paths):
            digits.save(state, path)
    return names


def mergefile(runs: dict[int, list[str]]) -> str:
    lines = []
    for seed, names in runs.items():
        for n in names:
            lines += [f"[models.{n}]", f'path = "models/{n}.safetensors"', ""]
        inputs = ", ".join(f'"{n}"' for n in names)
        lines += [f"[merges.auto{seed}]", 'method = "tail_average"', f"inputs = [{inputs}]", 'k = "auto"',
                  'scorer = { python = "tail_score:loss", direction = "minimize" }',
                  f'output = "out/auto{seed}.safetensors"', ""]
        for k in FIXED:
            lines += [f"[merges.k{k}_{seed}]", 'method = "tail_average"', f"inputs = [{inputs}]", f"k = {k}",
                      f'output = "out/k{k}_{seed}.safetensors"', ""]
    return "\n".join(lines)


def build(work: Path, runs: dict) -> dict:
    shutil.copy(HERE / "tail_score.py", work / "tail_score.py")
    (work / "mergefile.toml").write_text(mergefile(runs))
    proc = subprocess.run([sys.executable, "-m", "mergebuild", "-q", "--json", "-f", str(work / "mergefile.toml")],
                          check=True, cwd=work, capture_output=True, text=True, env=ONE_THREAD)
    return json.loads(proc.stdout)


def evaluate(work: Path, runs: dict, built: dict) -> dict:
    split = digits.digits()
    results = {}
    for seed in runs:
        row = {"chosen_k": built["tails"][f"auto{seed}"]["k"]}
        for name in [f"auto{seed}", *(f"k{k}_{seed}" for k in FIXED)]:
            state = digits.load(work / "out" / f"{name}.safetensors")
            row[name.rsplit(str(seed), 1)[0].rstrip("_")] = {
                "test": digits.accuracy(state, split.x_test, split.y_test),
                "validation_loss": tail_score.loss(str(work / "out" / f"{name}.safetensors"))}
        results[seed] = row
    return results


def table(results: dict) -> str:
    cols = ["k1", "k4", "k8", "k0", "auto"]
    rows = ["| run | chosen k | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for seed, r in results.items():
        rows.append(f"| {seed} | {r['chosen_k']} | " + " | ".join(f"{r[c]['test']:.3f}" for c in cols) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work" / "two_tailed")
    parser.add_argument("--fast", action="store_true", help="one run")
    args = parser.parse_args()
    seeds = SEEDS[:1] if args.fast else SEEDS
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {seed: train(args.work, seed) for seed in seeds}
    built = build(args.work, runs)
    results = evaluate(args.work, runs, built)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print("test accuracy: the last checkpoint (k1), fixed tails of 4, 8 and all 24 (k0), two-tailed (auto)")
    print(table(results))


if __name__ == "__main__":
    main()

"""Fisher merging with Fishers computed from data: two fine-tunes of one digit classifier, each
on half of the digits, merged by a plain average and by Fisher-weighted averaging (Matena &
Raffel 2022), the Fishers computed by mergebuild itself from a loss and a data script.

    .venv/bin/python examples/wholemodel/fisher.py          # 3 seeds: table (+ results.json)
    .venv/bin/python examples/wholemodel/fisher.py --fast   # 1 seed (what the test runs)

Data: scikit-learn's bundled digits (sklearn.datasets.load_digits, nothing is downloaded), 70%
to train, 30% to test. Per seed: a base MLP 64-64-64-10 (ReLU) trained for one epoch on all ten
digits, then two fine-tunes of it for 5 epochs (Adam, lr 5e-3): `ft_a` on the digits 0-4 only,
`ft_b` on 5-9 only (mergebuild/testing/digits.py). Each keeps the 10-way head, and forgets the
other half. The Mergefile the script writes has four computed sources per seed (each
fine-tune's Fisher from its own task's first 200 training examples: the empirical Fisher, with
the true labels, and the model's Fisher, the expectation over the model's own labels:
fisher_task.py), and three merges: `soup` (the plain average), `fisher` with the empirical
Fishers, `fisher` with the model's. One run of the real `mergebuild` CLI builds them. The joint evaluation is the accuracy on the whole test set (all ten digits,
one 10-way head); "per task" is the mean of each half's accuracy among its own five digits.
Everything lands in --work (default examples/wholemodel/work/fisher/).
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
SEEDS = [0, 1, 2]
HIDDEN = (64, 64)
SAMPLES = 200
TASKS = {"a": (0, 1, 2, 3, 4), "b": (5, 6, 7, 8, 9)}
MERGES = ("soup", "fisher_true", "fisher_model")


def train(work: Path, seeds) -> None:
    """The base and its two fine-tunes per seed (skipped when saved: training is deterministic)."""
    split = digits.digits()
    for seed in seeds:
        paths = {name: work / "models" / f"{name}{seed}.safetensors" for name in ("base", "ft_a", "ft_b")}
        if all(p.exists() for p in paths.values()):
            continue
        base = digits.train_mlp(split, hidden=HIDDEN, seed=seed, epochs=1)
        digits.save(base, paths["base"])
        for task, classes in TASKS.items():
            tuned = digits.train_mlp(split.only(classes), seed=seed + 100, start=base, epochs=5, lr=5e-3)
            digits.save(tuned, paths[f"ft_{task}"])


def mergefile(seeds) -> str:
    lines = []
    for seed in seeds:
        for task in TASKS:
            lines += [f"[models.ft_{task}{seed}]", f'path = "models/ft_{task}{seed}.safetensors"', ""]
            for kind, fn, batches, samples in (("true", "loss", f"batches_{task}", SAMPLES),
                                               ("model", "model_loss", f"model_batches_{task}", SAMPLES * 10)):
                lines += [f"[models.fisher_{kind}_{task}{seed}]", f'fisher_of = "ft_{task}{seed}"',
                          f'loss = "fisher_task.py:{fn}"', f'batches = "fisher_task.py:{batches}"',
                          f"samples = {samples}", ""]
        pair = f'"ft_a{seed}", "ft_b{seed}"'
        lines += [f"[merges.soup{seed}]", 'method = "soup"', f"inputs = [{pair}]",
                  f'output = "out/soup{seed}.safetensors"', ""]
        for kind in ("true", "model"):
            lines += [f"[merges.fisher_{kind}{seed}]", 'method = "fisher"',
                      f'inputs = [{pair}, "fisher_{kind}_a{seed}", "fisher_{kind}_b{seed}"]',
                      f'output = "out/fisher_{kind}{seed}.safetensors"', ""]
    return "\n".join(lines)


def build(work: Path, seeds) -> None:
    shutil.copy(HERE / "fisher_task.py", work / "fisher_task.py")
    (work / "mergefile.toml").write_text(mergefile(seeds))
    subprocess.run([sys.executable, "-m", "mergebuild", "-q", "-f", str(work / "mergefile.toml")], check=True,
                   cwd=work, env=ONE_THREAD)


def evaluate(work: Path, seeds) -> dict:
    """Per seed and model: accuracy on the whole test set, and the mean of the halves' accuracies."""
    split = digits.digits()
    results = {}
    for seed in seeds:
        files = {name: work / "models" / f"{name}{seed}.safetensors" for name in ("base", "ft_a", "ft_b")}
        files.update({m: work / "out" / f"{m}{seed}.safetensors" for m in MERGES})
        results[seed] = {name: {"joint": digits.accuracy(digits.load(p), split.x_test, split.y_test),
                                "per_task": _per_task(digits.load(p), split)} for name, p in files.items()}
    return results


def _per_task(state: dict, split) -> float:
    accs = []
    for classes in TASKS.values():
        part = split.only(classes)
        logits = digits.forward(state, part.x_test)[:, list(classes)]
        accs.append(digits.accuracy_of(logits, part.y_test, classes))
    return sum(accs) / len(accs)


def table(results: dict) -> str:
    names = ["base", "ft_a", "ft_b", *MERGES]
    rows = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed, r in results.items():
        rows.append(f"| {seed} | " + " | ".join(f"{r[n]['joint']:.3f} ({r[n]['per_task']:.3f})" for n in names) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work" / "fisher")
    parser.add_argument("--fast", action="store_true", help="one seed")
    args = parser.parse_args()
    seeds = SEEDS[:1] if args.fast else SEEDS
    args.work.mkdir(parents=True, exist_ok=True)
    train(args.work, seeds)
    build(args.work, seeds)
    results = evaluate(args.work, seeds)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print("accuracy on all ten digits (mean of the two halves, each among its own digits)")
    print(table(results))


if __name__ == "__main__":
    main()

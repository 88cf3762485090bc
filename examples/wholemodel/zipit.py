"""ZipIt! on small digit classifiers trained on different tasks: one model knows the digits 0-4,
the other 5-9, and neither has seen the other's. Zipped into one model (and partially zipped:
a shared trunk with one head per task) against the plain average and git re-basin
(Stoica et al. 2023, their disjoint-CIFAR experiment, shrunk).

    .venv/bin/python examples/wholemodel/zipit.py          # 3 pairs of models: table + plot
    .venv/bin/python examples/wholemodel/zipit.py --fast   # 1 pair (what the test runs)

Data: scikit-learn's bundled digits (sklearn.datasets.load_digits: 1797 8x8 images, nothing is
downloaded), 70% to train, 30% to test. Each pair: two MLPs 64-128-128-128-5 (ReLU) from
different seeds, one trained on the images of 0-4, one on those of 5-9, each head with a logit
per digit it knows (mergebuild/testing/digits.py). zipit runs both models on the training
images of all ten digits (`data`, a safetensors file the script writes: the union of the two
tasks' training inputs, as the paper uses).

Evaluation, as the paper's multi-head models: each model keeps its own output layer (its
head), on top of the merged layers: **joint** accuracy over the ten digits takes a softmax per
head and predicts the most probable digit of either head; **per task** accuracy is each head on
its own task's images (0-4 for A's head, 5-9 for B's), and the table shows their mean. The plain
average and re-basin average every layer but the output (both heads are kept: A's, and B's
aligned by `permute` for re-basin); full zipping writes both heads as one layer (`head =
"concat"`: A's five logits, then B's); partial zipping writes one head per input. The ensemble
(both models run side by side) is the bound the paper compares with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mergebuild.testing import digits  # noqa: E402

TASK_A, TASK_B = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
PAIRS = [(0, 1), (2, 3), (4, 5)]
# (merge, what the table calls it): zipit's own defaults, and the authors' function defaults
ZIPS = [("zip", "ZipIt! full (alpha 0.5, beta 1)"),
        ("zip_ref", "ZipIt! full (alpha 0.3, beta 0.125)"),
        ("zip_2", "ZipIt! partial 2 (trunk: 2 of 4 layers)"),
        ("zip_1", "ZipIt! partial 1 (trunk: 1 of 4 layers)")]


def train_pairs(work: Path, pairs) -> None:
    split = digits.digits()
    for a, b in pairs:
        for seed, task, name in ((a, TASK_A, "low"), (b, TASK_B, "high")):
            path = work / "models" / f"{name}{seed}.safetensors"
            if not path.exists():
                digits.save(digits.train_mlp(split, seed=seed, classes=task), path)
    data = work / "inputs.safetensors"
    if not data.exists():
        digits.save_inputs(split.x_train, data)


def mergefile(pairs) -> str:
    lines = []
    for a, b in pairs:
        lines += [f"[models.low{a}]", f'path = "models/low{a}.safetensors"',
                  f"[models.high{b}]", f'path = "models/high{b}.safetensors"', ""]
    for a, b in pairs:
        pair = f'inputs = ["low{a}", "high{b}"]'
        merges = {
            "avg": ['method = "weighted_sum"', "alpha = 0.5"],
            "aligned": ['method = "permute"'],
            "rebasin": ['method = "rebasin"', "alpha = 0.5"],
            "zip": ['method = "zipit"', 'data = "inputs.safetensors"', 'head = "concat"'],
            "zip_ref": ['method = "zipit"', 'data = "inputs.safetensors"', 'head = "concat"', "alpha = 0.3",
                        "beta = 0.125"],
            "zip_2": ['method = "zipit"', 'data = "inputs.safetensors"', "partial = 2"],
            "zip_1": ['method = "zipit"', 'data = "inputs.safetensors"', "partial = 1"],
        }
        for name, fields in merges.items():
            lines += [f"[merges.{name}_{a}_{b}]", *fields, pair, f'output = "out/{name}_{a}_{b}.safetensors"', ""]
    return "\n".join(lines)


def build(work: Path) -> None:
    """The real CLI, as a user runs it."""
    import os

    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    subprocess.run([sys.executable, "-m", "mergebuild", "-f", str(work / "mergefile.toml"), "-q"],
                   check=True, cwd=work, env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})


def scores(head_a, head_b, y) -> dict:
    """Joint and per-task accuracy of two heads' logits on the test images y."""
    import torch

    on_a, on_b = torch.isin(y, torch.tensor(TASK_A)), torch.isin(y, torch.tensor(TASK_B))
    task_a = digits.accuracy_of(head_a[on_a], y[on_a], TASK_A)
    task_b = digits.accuracy_of(head_b[on_b], y[on_b], TASK_B)
    return {"joint": digits.joint_accuracy([head_a, head_b], [TASK_A, TASK_B], y),
            "task_a": task_a, "task_b": task_b, "per_task": (task_a + task_b) / 2}


def _with_heads(trunk: dict, head_a: dict, head_b: dict, x) -> tuple:
    """Logits of both heads (the output layers of head_a and head_b) on a merged model's features."""
    last = digits.layer_count(trunk) - 1
    body = {k: v for k, v in trunk.items() if not k.startswith(f"layers.{last}.")}
    features = digits.features(body, x)
    out = []
    for head in (head_a, head_b):
        out.append(features @ head[f"layers.{last}.weight"].T + head[f"layers.{last}.bias"])
    return tuple(out)


def evaluate(work: Path, pairs) -> dict:
    """{"a_b": {model: scores}}."""
    split = digits.digits()
    x, y = split.x_test, split.y_test
    load = lambda name: digits.load(work / "out" / f"{name}.safetensors")  # noqa: E731
    results = {}
    for a, b in pairs:
        low, high = (digits.load(work / "models" / f"{n}.safetensors") for n in (f"low{a}", f"high{b}"))
        tag = f"{a}_{b}"
        row = {"ensemble": scores(digits.forward(low, x), digits.forward(high, x), y),
               "average": scores(*_with_heads(load(f"avg_{tag}"), low, high, x), y),
               "rebasin": scores(*_with_heads(load(f"rebasin_{tag}"), low, load(f"aligned_{tag}"), x), y)}
        for name in ("zip", "zip_ref"):
            logits = digits.forward(load(f"{name}_{tag}"), x)
            row[name] = scores(logits[:, :len(TASK_A)], logits[:, len(TASK_A):], y)
        for name in ("zip_2", "zip_1"):
            heads = digits.forward_heads(load(f"{name}_{tag}"), x)
            row[name] = scores(heads[f"low{a}"], heads[f"high{b}"], y)
        for name in row:
            row[name]["parameters"] = _parameters(work, name, tag, low)
        results[tag] = row
    return results


def _parameters(work: Path, name: str, tag: str, one: dict) -> float:
    """The model's size, in models (one MLP = 1)."""
    size = sum(t.numel() for t in one.values())
    if name == "ensemble":
        return 2.0
    file = {"average": f"avg_{tag}", "rebasin": f"rebasin_{tag}"}.get(name, f"{name}_{tag}")
    state = digits.load(work / "out" / f"{file}.safetensors")
    extra = 0 if name.startswith("zip") else sum(t.numel() for k, t in one.items()
                                                 if k.startswith(f"layers.{digits.layer_count(one) - 1}."))
    return (sum(t.numel() for t in state.values()) + extra) / size


LABELS = [("ensemble", "ensemble (both models, no merge)"), ("average", "plain average"),
          ("rebasin", "git re-basin (weight matching)"), *ZIPS]


def table(results: dict) -> str:
    mean = lambda model, what: sum(r[model][what] for r in results.values()) / len(results)  # noqa: E731
    lines = ["| model | joint | task 0-4 | task 5-9 | per-task mean | size (models) |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, label in LABELS:
        lines.append(f"| {label} | {mean(model, 'joint'):.3f} | {mean(model, 'task_a'):.3f} | "
                     f"{mean(model, 'task_b'):.3f} | {mean(model, 'per_task'):.3f} | {mean(model, 'parameters'):.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Joint and per-task accuracy of each model (the mean over the pairs), as bars."""
    from matplotlib.figure import Figure

    mean = lambda model, what: sum(r[model][what] for r in results.values()) / len(results)  # noqa: E731
    labels = [label for _, label in LABELS][::-1]
    fig = Figure(figsize=(7.5, 4.5), dpi=100)
    ax = fig.add_subplot()
    rows = range(len(labels))
    for offset, what, colour, name in ((0.2, "joint", "tab:blue", "joint (ten digits)"),
                                       (-0.2, "per_task", "tab:gray", "per-task mean")):
        values = [mean(model, what) for model, _ in LABELS][::-1]
        ax.barh([r + offset for r in rows], values, height=0.38, color=colour, label=name)
    ax.set_yticks(list(rows), labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test accuracy")
    ax.set_title("Digits 0-4 and 5-9 models merged", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return path


def run(work: Path, pairs) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    train_pairs(work, pairs)
    (work / "mergefile.toml").write_text(mergefile(pairs))
    build(work)
    return evaluate(work, pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="one pair of models instead of three")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "zipit")
    args = parser.parse_args(argv)
    results = run(args.work, PAIRS[:1] if args.fast else PAIRS)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"plot: {plot(results, args.work / 'zipit.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Git re-basin on small digit classifiers: a plain average of two independently trained models
loses much of their accuracy halfway between them, the average after weight matching keeps it
(Ainsworth et al. 2022, the loss-barrier experiment, shrunk to fit a laptop).

    .venv/bin/python examples/wholemodel/rebasin.py          # 3 pairs of models: table + plot
    .venv/bin/python examples/wholemodel/rebasin.py --fast   # 1 pair (what the test runs)

Data: scikit-learn's bundled digits (sklearn.datasets.load_digits: 1797 8x8 images, nothing is
downloaded), 70% to train, 30% to test. Each pair: two MLPs 64-128-128-128-10 (ReLU), trained
with Adam from different seeds on the same ten digits (mergebuild/testing/digits.py). The
Mergefile the script writes holds, for each alpha in 0, 0.1, ..., 1, a `weighted_sum` and a
`rebasin` merge of the pair; one run of the real `mergebuild` CLI builds them all (the weight
matching is one statistic, computed once and shared by the eleven rebasin merges).
Everything lands in --work (default examples/wholemodel/work/rebasin/).
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

ALPHAS = [round(0.1 * i, 1) for i in range(11)]
PAIRS = [(0, 1), (2, 3), (4, 5)]
METHODS = ("weighted_sum", "rebasin")


def train_pairs(work: Path, pairs) -> None:
    """Two models per pair (skipped when already saved: the training is deterministic)."""
    split = digits.digits()
    for pair in pairs:
        for seed in pair:
            path = work / "models" / f"mlp{seed}.safetensors"
            if not path.exists():
                digits.save(digits.train_mlp(split, seed=seed), path)


def mergefile(pairs, alphas=ALPHAS) -> str:
    lines = []
    for seed in sorted({s for pair in pairs for s in pair}):
        lines += [f"[models.mlp{seed}]", f'path = "models/mlp{seed}.safetensors"', ""]
    for a, b in pairs:
        for method in METHODS:
            for alpha in alphas:
                name = _merge(method, a, b, alpha)
                lines += [f"[merges.{name}]", f'method = "{method}"', f'inputs = ["mlp{a}", "mlp{b}"]',
                          f"alpha = {alpha}", f'output = "out/{name}.safetensors"', ""]
    return "\n".join(lines)


def _merge(method: str, a: int, b: int, alpha: float) -> str:
    return f"{'avg' if method == 'weighted_sum' else 'rebasin'}_{a}_{b}_{int(round(alpha * 10)):02d}"


def build(work: Path) -> None:
    """The real CLI, as a user runs it."""
    subprocess.run([sys.executable, "-m", "mergebuild", "-f", str(work / "mergefile.toml"), "-q"],
                   check=True, cwd=work, env=_env())


def _env() -> dict:
    import os

    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def accuracies(work: Path, pairs, alphas=ALPHAS) -> dict:
    """{"a_b": {method: [test accuracy at each alpha]}}."""
    split = digits.digits()
    out = {}
    for a, b in pairs:
        out[f"{a}_{b}"] = {
            method: [digits.accuracy(digits.load(work / "out" / f"{_merge(method, a, b, alpha)}.safetensors"),
                                     split.x_test, split.y_test) for alpha in alphas]
            for method in METHODS}
    return out


def barrier(curve: list[float]) -> float:
    """How far the accuracy halfway falls below the line between the two ends."""
    return (curve[0] + curve[-1]) / 2 - curve[len(curve) // 2]


def table(results: dict, alphas=ALPHAS) -> str:
    """Markdown: the accuracy along alpha, averaged over the pairs."""
    mean = {m: [sum(r[m][i] for r in results.values()) / len(results) for i in range(len(alphas))] for m in METHODS}
    head = "| alpha | " + " | ".join(f"{a:.1f}" for a in alphas) + " |"
    rule = "|---|" + "---:|" * len(alphas)
    rows = [f"| {'plain average' if m == 'weighted_sum' else 'weight-matched (rebasin)'} | "
            + " | ".join(f"{v:.3f}" for v in mean[m]) + " |" for m in METHODS]
    return "\n".join([head, rule, *rows])


def plot(results: dict, path: Path, alphas=ALPHAS) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    for method, colour, label in (("weighted_sum", "tab:red", "plain average"),
                                  ("rebasin", "tab:blue", "weight-matched (rebasin)")):
        for i, curve in enumerate(results.values()):
            ax.plot(alphas, curve[method], color=colour, alpha=0.8, marker="o", markersize=3,
                    label=label if i == 0 else None)
    ax.set_xlabel("alpha (B's share)")
    ax.set_ylabel("test accuracy")
    pairs = f"{len(results)} pairs" if len(results) > 1 else "One pair"
    ax.set_title(f"{pairs} of digits MLPs from different seeds, interpolated")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center")
    fig.tight_layout()
    fig.savefig(path)
    return path


def run(work: Path, pairs) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    train_pairs(work, pairs)
    (work / "mergefile.toml").write_text(mergefile(pairs))
    build(work)
    return accuracies(work, pairs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="one pair of models instead of three")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "work" / "rebasin")
    args = parser.parse_args(argv)
    pairs = PAIRS[:1] if args.fast else PAIRS
    results = run(args.work, pairs)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    for pair, curves in results.items():
        print(f"pair {pair}: barrier at alpha 0.5: plain {barrier(curves['weighted_sum']):.3f}, "
              f"weight-matched {barrier(curves['rebasin']):.3f}")
    print(f"plot: {plot(results, args.work / 'rebasin.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pictures: the diff heatmap and the DAG are real images; render_dot uses `dot` only if present."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import save_file

from mergebuild.analyze.diff import diff_files
from mergebuild.render.dag_layers import layered_layout
from mergebuild.render.plots import plot_diff, plot_graph, render_dot
from mergebuild.testing.fabricate import fabricate_family, llama_keys, make_base, make_finetune

NODES = [
    {"name": "base", "label": "base\nbase.safetensors", "state": "source"},
    {"name": "real", "label": "real\nreal.safetensors", "state": "source"},
    {"name": "mix1", "label": "mix1\nweighted_sum(alpha=0.4)", "state": "up to date"},
    {"name": "mix2", "label": "mix2\nadd_difference", "state": "dirty"},
    {"name": "final", "label": "final", "state": "pending"},
]
EDGES = [("real", "mix1"), ("base", "mix1"), ("mix1", "mix2"), ("base", "mix2"), ("mix2", "final"), ("real", "final")]


@pytest.fixture(scope="module")
def diffs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("models")
    sd1 = fabricate_family(out, "sd1-ldm", 32, names=("base", "real"), prefix="sd1-")
    base = make_base(llama_keys(), seed=1, dtype=torch.float32)
    save_file(base, str(out / "llama.safetensors"))
    save_file(make_finetune(base, seed=2), str(out / "llama-tuned.safetensors"))
    return {"sd1": diff_files(*sd1), "llama": diff_files(out / "llama.safetensors", out / "llama-tuned.safetensors")}


def image_size(path: Path) -> tuple[int, int]:
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.std() > 0.01  # not a blank canvas
    return pixels.shape[0], pixels.shape[1]


def test_sd1_diff_heatmap(diffs, tmp_path):
    path = plot_diff(diffs["sd1"], tmp_path / "pics" / "diff.png")
    height, width = image_size(path)
    assert height > 600 and width > 400  # 26 blocks and 4 components, one row each


def test_generic_diff_heatmap_and_svg(diffs, tmp_path):
    height, width = image_size(plot_diff(diffs["llama"], tmp_path / "diff.png", title="llama"))
    assert height > 100 and width > 100
    svg = plot_diff(diffs["llama"], tmp_path / "diff.svg").read_text()
    assert "<svg" in svg and "relative L2" in svg


def test_heatmap_with_undefined_values(tmp_path):
    diff = {"grouping": "layer", "total": {"name": "total"},
            "blocks": [{"name": "0", "cosine": None, "rel_l2": None, "changed": 1.0},
                       {"name": "1", "cosine": 1.0, "rel_l2": 0.0, "changed": 0.0}],
            "components": [{"name": "other", "cosine": 0.5, "rel_l2": 2.0, "changed": 0.5}]}
    height, width = image_size(plot_diff(diff, tmp_path / "d.png"))
    assert height > 100 and width > 100


def test_graph_png_and_svg(tmp_path):
    height, width = image_size(plot_graph(NODES, EDGES, tmp_path / "graph.png", title="Mergefile"))
    assert height > width > 300  # four layers, top to bottom
    svg = plot_graph(NODES, EDGES, tmp_path / "graph.svg").read_text()
    assert "<svg" in svg and "weighted_sum" in svg and "#b7e1b0" in svg.lower()  # graph.STATE_COLOURS


def test_layered_layout_follows_generations():
    import networkx as nx

    graph = nx.DiGraph(EDGES)
    pos = layered_layout(graph)
    assert {n: x for n, (x, _) in pos.items()} == {"real": 0, "base": 0, "mix1": 1, "mix2": 2, "final": 3}
    assert len({pos["real"], pos["base"]}) == 2


def test_graph_errors(tmp_path):
    with pytest.raises(ValueError, match="cycle"):
        plot_graph([{"name": "a", "state": "dirty"}, {"name": "b", "state": "dirty"}], [("a", "b"), ("b", "a")],
                   tmp_path / "g.png")
    with pytest.raises(ValueError, match="no node named 'c'"):
        plot_graph([{"name": "a", "state": "dirty"}], [("a", "c")], tmp_path / "g.png")
    with pytest.raises(ValueError, match="unsupported picture format"):
        plot_graph(NODES, EDGES, tmp_path / "g.jpg")


DOT = 'digraph mergebuild {\n  "a" -> "b";\n}\n'


def fake_dot(folder: Path, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "dot"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_render_dot_without_dot(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert render_dot(DOT, tmp_path / "g.svg") is False
    assert not (tmp_path / "g.svg").exists()


def test_render_dot_runs_dot(tmp_path, monkeypatch):
    # a stand-in dot: records its arguments and writes its input to the -o file
    fake_dot(tmp_path / "bin", 'echo "$@" > "$(dirname "$0")/args"\ncat > "$3"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert render_dot(DOT, tmp_path / "out" / "g.svg") is True
    assert (tmp_path / "out" / "g.svg").read_text() == DOT
    assert (tmp_path / "bin" / "args").read_text().split() == ["-Tsvg", "-o", str(tmp_path / "out" / "g.svg")]


def test_render_dot_failure(tmp_path, monkeypatch):
    fake_dot(tmp_path / "bin", 'echo "syntax error in line 1" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(RuntimeError, match="syntax error"):
        render_dot(DOT, tmp_path / "g.png")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")
def test_render_dot_with_graphviz(tmp_path):
    assert render_dot(DOT, tmp_path / "g.png") is True
    height, width = image_size(tmp_path / "g.png")
    assert height > 20 and width > 20

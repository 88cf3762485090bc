"""The pictures read back as pixels: the DAG of real Mergefile projects (top to bottom, every
state's colour, targets marked, no edge through a box, sensible sizes from 3 to 40 merges), its
text forms carrying the same labels, and the diff heatmap on absolute scales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import load_file, save_file

from tests.conftest import chain, mergefile, run_cli
from mergebuild.analyze.diff import diff_files
from mergebuild.mergefile.parse import load_mergefile
from mergebuild.render.graph import STATE_COLOURS, TARGET_BORDER, to_dot, to_mermaid, to_nodes, to_text
from mergebuild.render.plots import SIMILAR_COLOURS, graph_layout, plot_diff, plot_graph
from mergebuild.testing.fabricate import fabricate_family, make_finetune


def pixels(path: Path) -> np.ndarray:
    """The picture as (height, width, 3) integers 0..255."""
    image = imread(path)
    assert image.ndim == 3 and image.std() > 0.01  # not a blank canvas
    return np.rint(image[..., :3] * 255).astype(int)


def count_colour(image: np.ndarray, hex_colour: str, tolerance: int = 3) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image - rgb).max(axis=2) <= tolerance).sum())


def graph_png(project: Path, name: str = "g.png") -> np.ndarray:
    run_cli("graph", "--format", "png", "-o", project / name, cwd=project, check=True)
    return pixels(project / name)


def long_chain(n: int) -> str:
    """n weighted sums in a row, each mixing in one of three sources by turns; the last is the target."""
    sources = ("real", "anime", "base")
    text = "".join(f'[models.{s}]\npath = "models/{s}.safetensors"\n' for s in sources)
    previous = "base"
    for i in range(1, n + 1):
        text += f'[merges.m{i}]\nmethod = "weighted_sum"\ninputs = ["{previous}", "{sources[i % 3]}"]\nalpha = 0.5\n'
        previous = f"m{i}"
    return text + 'output = "out/final.safetensors"\n'


SHARED = """
[models.base]
path = "models/base.safetensors"
[models.real]
path = "models/real.safetensors"
[models.anime]
path = "models/anime.safetensors"
""" + "".join(f"""
[merges.{name}]
method = "weighted_sum"
inputs = [{inputs}]
alpha = 0.5
""" for name, inputs in (("a1", '"real", "anime"'), ("a2", '"anime", "base"'), ("a3", '"base", "real"'),
                         ("b1", '"a1", "a2"'), ("b2", '"a2", "a3"'), ("b3", '"a3", "a1"'),
                         ("c1", '"b1", "b2"'), ("c2", '"b2", "b3"'), ("c3", '"b3", "real"'),
                         ("d1", '"c1", "c2"'), ("d2", '"c2", "c3"'), ("e1", '"d1", "d2"'))) + """
output = "out/e1.safetensors"
"""


def test_chain_is_portrait_with_every_state_and_the_target_marked(project):
    mf = mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)  # all up to date
    mf.write_text(chain(a2=0.6))  # mix1 stays up to date, mix2 dirty, final pending
    image = graph_png(project)
    height, width = image.shape[:2]
    assert 300 < width < height < 1200  # top to bottom, not a 5000 px strip
    # each state fills at least one box (a legend swatch alone is about 380 px)
    for state, colour in STATE_COLOURS.items():
        assert count_colour(image, colour) > 3000, state
    assert count_colour(image, TARGET_BORDER, tolerance=12) > 1000  # the target's thick border


def boxes_and_routes(project: Path):
    mf = load_mergefile(project / "mergefile.toml")
    layout = graph_layout(*to_nodes(mf, {}))
    boxes = {k: it for k, it in layout.items.items() if it.kind != "lane"}
    return mf, layout, boxes


def test_edges_go_down_between_layers_and_never_through_a_box(project):
    mergefile(project / "mergefile.toml", SHARED)
    mf, layout, boxes = boxes_and_routes(project)
    assert layout.columns == []  # 12 merges: one column
    for src, dst, _, path in layout.edges:
        assert boxes[src].bottom < boxes[dst].top  # sources above what reads them
        points = [p for seg, _ in path.iter_bezier() for p in seg(np.linspace(0, 1, 12))]
        for key, box in boxes.items():
            inside = [p for p in points if abs(p[0] - box.x) < box.w / 2 - 1e-6 and abs(p[1] - box.y) < box.h / 2 - 1e-6]
            assert not inside, f"{src} -> {dst} crosses {key}"
    for a, b in [(a, b) for a in boxes.values() for b in boxes.values() if a is not b]:
        assert abs(a.x - b.x) >= (a.w + b.w) / 2 or abs(a.y - b.y) >= (a.h + b.h) / 2  # no overlap
    assert boxes["e1"].y == max(b.y for b in boxes.values())  # the target at the bottom


def test_a_12_merge_dag_is_readable_at_its_natural_size(project):
    mergefile(project / "mergefile.toml", SHARED)
    height, width = graph_png(project).shape[:2]
    assert 400 < width < 1400 and 400 < height < 2000


def test_a_40_merge_chain_folds_into_columns(project):
    mergefile(project / "mergefile.toml", long_chain(40))
    height, width = graph_png(project).shape[:2]
    assert max(height, width) < 3500 and 0.5 < height / width < 2.5
    _, layout, boxes = boxes_and_routes(project)
    assert len(layout.columns) >= 2
    notes = [b.text for b in boxes.values() if b.kind == "connector"]
    assert any(t.startswith("to m") for t in notes) and any(t.startswith("from m") for t in notes)


def source(name: str) -> dict:
    return {"name": name, "label": f"{name}\n{name}.safetensors", "state": "source"}


def test_wide_dags_are_not_strips(tmp_path):
    # a soup of 30 models: its sources become one block of boxes, lettered as its inputs
    nodes = [source(f"model{i}") for i in range(30)] + [{"name": "soup", "label": "soup\nsoup()", "state": "dirty"}]
    edges = [(f"model{i}", "soup") for i in range(30)]
    height, width = pixels(plot_graph(nodes, edges, tmp_path / "soup.png")).shape[:2]
    assert width < 1600 and width / height < 4
    (block,) = [it for it in graph_layout(nodes, edges).items.values() if it.kind == "group"]
    assert [letter for _, letter in block.members][:3] == ["A", "B", "C"] and len(block.members) == 30
    # ten unconnected merges: shelves, not one row of 30 boxes
    nodes, edges = [], []
    for k in range(10):
        nodes += [source(f"a{k}"), source(f"b{k}"), {"name": f"mix{k}", "label": f"mix{k}\nweighted_sum", "state": "pending"}]
        edges += [(f"a{k}", f"mix{k}"), (f"b{k}", f"mix{k}")]
    height, width = pixels(plot_graph(nodes, edges, tmp_path / "ten.png")).shape[:2]
    assert max(height, width) < 1500 and 0.5 < height / width < 2


MBW = """
[models.base]
path = "models/base.safetensors"
[models.real]
path = "models/real.safetensors"

[merges.mbw]
method = "weighted_sum"
inputs = ["base", "real"]
alpha = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
dtype = "float16"
output = "out/mbw.safetensors"
[[merges.mbw.rules]]
blocks = "IN04-IN08"
alpha = 0.2

[merges.soup]
method = "soup"
inputs = ["base", "real"]
weights = [1.0, 2.0]
"""


def test_labels_carry_method_parameters_dtype_rules_and_file(project):
    mf = load_mergefile(mergefile(project / "mergefile.toml", MBW))
    text = to_text(mf)
    assert text.startswith("mbw = weighted_sum(alpha: MBW 26 values), dtype float16, 1 rule -> mbw.safetensors")
    nodes, _ = to_nodes(mf, {})
    (node,) = [n for n in nodes if n["name"] == "mbw"]
    assert node["target"] and node["label"].splitlines() == [
        "mbw", "weighted_sum(alpha: MBW 26 values)", "dtype float16, 1 rule", "→ mbw.safetensors"]
    dot, mermaid = to_dot(mf), to_mermaid(mf)
    assert "rankdir=TB" in dot and "penwidth=3" in dot and "legend up to date" in dot
    for rendered in (dot, mermaid):
        assert "MBW 26 values" in rendered and "dtype float16, 1 rule" in rendered and "→ mbw.safetensors" in rendered
        assert "soup(weights=[1.0, 2.0])" in rendered  # one weight per model: not block values


# --- the diff heatmap and mismatched architectures ------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("models")
    base, tuned = fabricate_family(out, "sd1-ldm", 32, names=("base", "real"), prefix="sd1-")
    near = out / "sd1-near.safetensors"
    save_file(make_finetune(load_file(str(base)), seed=3, scale=0.0005), str(near))
    far = out / "sd1-far.safetensors"
    save_file(make_finetune(load_file(str(base)), seed=4, scale=0.05), str(far))
    (sdxl,) = fabricate_family(out, "sdxl-sgm", 32, names=("base",), prefix="sdxl-")
    return {"sd1": base, "tuned": tuned, "near": near, "far": far, "sdxl": sdxl}


def similar_and_different(path: Path) -> tuple[int, int]:
    """Pixels of a line across the upper heatmap (above the colour bars) nearest a colour of the
    similar half of the scale, and of its different half."""
    line = pixels(path)[int(imread(path).shape[0] * 0.35)]
    palette = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in SIMILAR_COLOURS])
    distance = np.abs(line[:, None, :] - palette[None, :, :]).max(axis=2)
    nearest, close = distance.argmin(axis=1), distance.min(axis=1) < 40
    half = len(SIMILAR_COLOURS) // 2
    return int((close & (nearest < half)).sum()), int((close & (nearest >= half)).sum())


def test_near_identical_models_look_similar(models, tmp_path):
    near = diff_files(models["sd1"], models["near"])
    assert near["mismatch"] is None and near["total"]["cosine"] > 0.999
    similar, different = similar_and_different(plot_diff(near, tmp_path / "near.png"))
    assert similar > 250 and different == 0  # the cosine and the L2 column, each about 190 px wide
    # the usual fine-tune (cosine 0.98, L2 0.2) is on the similar side too: the scales are absolute
    tuned = plot_diff(diff_files(models["sd1"], models["tuned"]), tmp_path / "tuned.png")
    similar, different = similar_and_different(tuned)
    assert similar > 250 and different == 0
    # and the check can fail: models far apart (cosine 0.7) are red
    similar, different = similar_and_different(plot_diff(diff_files(models["sd1"], models["far"]), tmp_path / "far.png"))
    assert different > 250 and similar == 0


def test_the_heatmap_legend_names_each_columns_range(models, tmp_path):
    svg = plot_diff(diff_files(models["sd1"], models["tuned"]), tmp_path / "d.svg").read_text()
    assert svg.count("this diff: ") == 3 and "cosine similarity" in svg


def test_different_architectures_are_said_plainly(models, tmp_path):
    doc = diff_files(models["sd1"], models["sdxl"])
    assert doc["mismatch"] == "different architectures: sd1 vs sdxl"
    assert doc["architecture"]["name"] == "sd1" and doc["architecture_b"]["name"] == "sdxl"
    proc = run_cli("diff", models["sd1"], models["sdxl"], "--plot", tmp_path / "d.svg", cwd=tmp_path, check=True)
    assert proc.stdout.splitlines()[0].endswith(": different architectures: sd1 vs sdxl")
    assert "{" not in proc.stdout and "by block" not in proc.stdout
    svg = (tmp_path / "d.svg").read_text()
    assert "different architectures: sd1 vs sdxl" in svg
    listed = json.loads(run_cli("diff", models["sd1"], models["sdxl"], "--json", cwd=tmp_path, check=True).stdout)
    assert listed["mismatch"] == doc["mismatch"] and {"total", "blocks", "components", "shape_mismatch"} <= set(listed)
    assert diff_files(models["sd1"], models["tuned"])["mismatch"] is None

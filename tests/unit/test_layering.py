"""Imports point one way: spec -> plan -> execute -> store is the data flow, and lower layers
never import higher ones (../docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mergebuild"

# each module (or package) and its layer; a module may import only its own layer or lower ones
LAYERS = {
    "errors": 0, "dtypes": 0, "torchlazy": 0, "portable": 0, "failures": 0,
    "layouts": 1, "mergefile": 1, "methods": 1,
    "tensors": 2,
    "store": 3,
    "planning": 4,
    "record": 5,
    "execute": 6, "analyze": 6,
    "project": 7, "tune": 8, "api": 8,
    "render": 8, "cli": 9, "__main__": 10,
    "testing": 10,
}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mergebuild"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mergebuild"))


def test_every_module_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.glob("*") if p.name != "__pycache__"}
    assert units - {"__init__"} <= set(LAYERS), units - set(LAYERS)


def test_imports_only_point_down():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for target in imports(path):
            there = unit(target)
            if there != "__init__" and LAYERS[there] > LAYERS[here]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_only_the_compute_side_imports_torch_directly():
    allowed = {"torchlazy.py", "testing"}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        tree = ast.parse(path.read_text())
        direct = any(isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names) for n in ast.walk(tree))
        if direct:
            assert rel.parts[0] in allowed or rel.name in allowed, f"{rel} imports torch eagerly; use mergebuild.torchlazy"

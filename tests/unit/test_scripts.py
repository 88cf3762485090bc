"""mergefile/scripts.py: which files a user's script's digest covers (the script and the project
modules it imports, transitively, relative imports inside packages included; never installed
packages nor files outside the Mergefile's folder), and the names it binds."""

from __future__ import annotations

from pathlib import Path

from mergebuild.mergefile.scripts import bound_names, parse_script, script_digests


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _covered(root: Path, script: str = "train.py") -> set[str]:
    path = root / script
    return {p.relative_to(root.resolve()).as_posix() for p in script_digests(path, parse_script(path), root)}


def test_the_digest_follows_project_imports_and_stops_at_installed_packages(tmp_path):
    root = tmp_path / "project"
    _tree(root, {
        "train.py": "import numpy\nimport helpers\nfrom pkg import sub\nfrom pkg.deep import leaf as L\n",
        "helpers.py": "import os\nfrom more import x\n",
        "more.py": "x = 1\n",
        "pkg/__init__.py": "from . import rel\n",
        "pkg/rel.py": "",
        "pkg/sub.py": "",
        "pkg/deep/__init__.py": "",
        "pkg/deep/leaf.py": "",
        "rel.py": "# a decoy beside the package: `from . import rel` in pkg is pkg/rel.py\n",
        "unused.py": "",
    })
    (tmp_path / "outside.py").write_text("")
    covered = _covered(root)
    assert covered == {"train.py", "helpers.py", "more.py", "pkg/__init__.py", "pkg/rel.py", "pkg/sub.py",
                       "pkg/deep/__init__.py", "pkg/deep/leaf.py"}


def test_a_changed_helper_changes_its_digest_and_nothing_else(tmp_path):
    _tree(tmp_path, {"train.py": "import helpers\n", "helpers.py": "A = 1\n"})
    path = tmp_path / "train.py"
    before = script_digests(path, parse_script(path), tmp_path)
    (tmp_path / "helpers.py").write_text("A = 2\n")
    after = script_digests(path, parse_script(path), tmp_path)
    changed = {p.name for p in before if before[p] != after[p]}
    assert changed == {"helpers.py"}


def test_bound_names_are_the_top_level_bindings():
    import ast

    tree = ast.parse("import os.path\nfrom x import y as z\ndef f(): pass\nclass C: pass\na = b = 1\nn: int = 2\n"
                     "if True:\n    hidden = 1\n")
    assert bound_names(tree) == {"os", "z", "f", "C", "a", "b", "n"}

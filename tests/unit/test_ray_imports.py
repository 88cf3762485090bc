"""Ray is an optional extra: only the --ray modules import it, and only inside functions, so
importing mergebuild (and any build without --ray) never loads it (docs/cluster.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mergebuild"
RAY_MODULES = {"execute/ray_cluster.py", "execute/ray_tasks.py", "tune/ray_runner.py"}


def ray_imports(tree: ast.AST):
    """(line, at module level?) of every `import ray...` / `from ray... import`."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "ray" or n.startswith("ray.") for n in names):
            yield node.lineno, id(node) in top


def test_only_the_ray_modules_import_ray_and_only_lazily():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, top in ray_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if rel not in RAY_MODULES:
                wrong.append(f"{rel}:{line} imports ray")
            elif top:
                wrong.append(f"{rel}:{line} imports ray at module level")
    assert not wrong, "\n".join(wrong)


def test_a_ray_drivers_stdout_keeps_only_the_main_threads_writes():
    """Ray's listener threads print cluster messages to stdout; `--json` must stay parseable."""
    import io
    import threading

    from mergebuild.execute.ray_cluster import MainThreadStdout

    out, err = io.StringIO(), io.StringIO()
    guarded = MainThreadStdout(out, err)
    worker = threading.Thread(target=lambda: guarded.write("(raylet) A worker died\n"))
    worker.start()
    worker.join()
    guarded.write('{"ok": true}\n')
    assert out.getvalue() == '{"ok": true}\n'
    assert err.getvalue() == "(raylet) A worker died\n"

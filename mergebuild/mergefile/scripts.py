"""The user's Python scripts a Mergefile names (fisher_of's `loss` / `batches`, zipit's `data =
"x.py:batches"`): what planning reads of them as text, and how the build runs them.

Planning never runs a script: it parses it (ast), checks the function is bound at its top level,
and digests the script and every module it imports that resolves to a file under the Mergefile's
folder (the script's own folder first, then the Mergefile's), transitively, so an edited helper
module changes the key of whatever the script computes. Installed packages are not followed.
The build runs a script with those folders on sys.path and forgets the project's modules it
loaded afterwards, so the next run reads an edited helper anew.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import xxhash

MAX_SCRIPT = 16 << 20  # bytes: a larger "script" is not one


def parse_script(path: Path) -> ast.Module:
    """The script's syntax tree (OSError, ValueError for NUL bytes, SyntaxError: the caller's one line)."""
    return ast.parse(Path(path).read_bytes(), filename=str(path))


def bound_names(tree: ast.Module) -> set[str]:
    """The names a script binds at its top level: defs, classes, assignments, imports."""
    bound = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            bound |= {t.id for t in targets if isinstance(t, ast.Name)}
    return bound


def script_digests(path: Path, tree: ast.Module, root: Path, files: dict[Path, str] | None = None) -> dict[Path, str]:
    """The script and every project module it imports, transitively: {resolved file: xxh3-128 of its bytes}."""
    files = {} if files is None else files
    path = Path(path).resolve()
    if path in files:
        return files
    files[path] = xxhash.xxh3_128(path.read_bytes()).hexdigest()
    for module in _imported(tree):
        for found in _resolve(module, [path.parent, root], root):
            if found in files:
                continue
            try:
                sub = parse_script(found)
            except (OSError, ValueError, SyntaxError):
                files[found] = xxhash.xxh3_128(found.read_bytes()).hexdigest() if found.is_file() else "unreadable"
                continue
            script_digests(found, sub, root, files)
    return files


def _imported(tree: ast.Module) -> list[str]:
    """Dotted names of the modules the file imports (relative ones keep their leading dots)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.append(base)
            # from pkg import submodule: pkg.submodule (from . import helper: .helper, beside the file)
            out += [f"{base}.{a.name}" if node.module else base + a.name for a in node.names]
    return out


def _resolve(module: str, folders: list[Path], root: Path) -> list[Path]:
    """The files under root a dotted module name loads: each package's __init__.py and the module."""
    if module.startswith("."):
        dots = len(module) - len(module.lstrip("."))
        folders = [folders[0].parents[dots - 2] if dots > 1 else folders[0]]
        module = module.lstrip(".")
    parts = [p for p in module.split(".") if p]
    for folder in folders:
        found = []
        here = folder
        for part in parts:
            package, plain = here / part / "__init__.py", here / f"{part}.py"
            if package.is_file():
                found.append(package)
                here = here / part
            elif plain.is_file():
                found.append(plain)
                break
            else:
                break
        found = [f.resolve() for f in found if _under(f, root)]
        if found:
            return found
    return []


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def load_script(path: Path, prefix: str):
    """Run the script as a module of its own (registered under a name from its path); its
    exceptions propagate: the caller turns them into its one line."""
    module_name = prefix + xxhash.xxh3_64_hexdigest(str(path).encode())
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class user_modules:
    """The scripts' folders on sys.path while they run (their local imports resolve); the
    scripts and the project's modules they loaded forgotten afterwards, so an edited helper is
    read anew (never an installed package: numpy and the like cannot be imported twice). No
    bytecode is written meanwhile: Python trusts a .pyc whose source has the same size and mtime
    second, so a helper edited within a second of a build (same length) ran its old code."""

    def __init__(self, folders: list, local: list, prefix: str):
        self.folders = [str(f) for f in dict.fromkeys(folders)]
        self.local = {str(Path(f).resolve()) for f in local}
        self.prefix = prefix

    def __enter__(self):
        self.before = set(sys.modules)
        self.bytecode = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        sys.path[:0] = self.folders
        return self

    def __exit__(self, *exc):
        sys.dont_write_bytecode = self.bytecode
        for folder in self.folders:
            if folder in sys.path:
                sys.path.remove(folder)
        for name in set(sys.modules) - self.before:
            origin = getattr(sys.modules[name], "__file__", None)
            if name.startswith(self.prefix) or (origin and str(Path(origin).resolve()) in self.local):
                del sys.modules[name]
        return False

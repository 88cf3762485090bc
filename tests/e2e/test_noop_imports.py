"""A no-op build imports only what it uses: the modules that only some builds need (a remote
tier, a computed source, other methods, the renderers' rich, the plugins' importlib.metadata,
torch) are imported inside the functions that use them, so `mergebuild` on a built project
stays fast (docs/benchmarks.md). Checked in a fresh interpreter: one import at module level
brings them back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, chain, mergefile, run_cli

# what a no-op build of weighted sums and an add_difference must not import
NOT_IMPORTED = {
    "torch", "numpy", "scipy", "networkx", "ray", "fsspec", "tomlkit", "rich", "importlib.metadata",
    "uuid", "difflib",
    "mergebuild.store.remote", "mergebuild.store.remote_reads",
    "mergebuild.record.lineage_read", "mergebuild.record.inherit",
    "mergebuild.planning.computed", "mergebuild.methods.fisher_data", "mergebuild.mergefile.scripts",
    "mergebuild.layouts.lora_names", "mergebuild.layouts.permutations", "mergebuild.layouts.layer_specs",
    "mergebuild.methods.selection", "mergebuild.methods.lora_formats",
    *(f"mergebuild.methods.{m}" for m in ("classic", "meh", "task_vectors", "many", "lora", "lora_make",
                                          "mergekit_methods", "passthrough", "rebasin", "zipit")),
}

NO_OP = """
import json, sys
from mergebuild.cli import main
code = main(["-q", "--json"])
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


def test_a_no_op_build_imports_only_what_it_uses(project, tmp_path):
    mergefile(project / "mergefile.toml", '[settings]\ncache = "cache"\n' + chain())
    run_cli("-q", cwd=project, check=True)
    listed = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_OP, str(listed)], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merges = json.loads(proc.stdout)["merges"]
    assert merges and not any(m["computed"] or m["written"] for m in merges.values())  # a no-op indeed
    modules = set(json.loads(listed.read_text()))
    assert "mergebuild.planning.planner" in modules  # it did plan
    assert not modules & NOT_IMPORTED, sorted(modules & NOT_IMPORTED)

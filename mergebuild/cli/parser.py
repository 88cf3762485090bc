"""The argument parser: each subcommand with its description, examples and own options."""

from __future__ import annotations

import argparse
from pathlib import Path

from mergebuild import __version__
from mergebuild.cli import commands

EXAMPLES = {
    "build": """examples:
  mergebuild                      build every target (every merge with an output)
  mergebuild final mix2           build these merges and what they need
  mergebuild -n -v                what a build would do, and why
  mergebuild --force --device cuda""",
    "status": """examples:
  mergebuild status               what a build would change, and why
  mergebuild status --check       exit 1 when a target is out of date (a CI gate, like make -q)""",
    "explain": """examples:
  mergebuild explain final        per merge: tensors to recompute by block, and why""",
    "graph": """examples:
  mergebuild graph                the DAG as an indented tree, with states
  mergebuild graph --format png -o lineage.png
  mergebuild graph --format mermaid >> README.md""",
    "lineage": """examples:
  mergebuild lineage out/final.safetensors
  mergebuild lineage model.safetensors --format dot | dot -Tpng > lineage.png""",
    "inspect": """examples:
  mergebuild inspect model.safetensors
  mergebuild inspect lora.safetensors --no-hashes --json""",
    "diff": """examples:
  mergebuild diff base.safetensors out/final.safetensors --plot diff.png""",
    "cache": """examples:
  mergebuild cache stats          bytes on disk by kind, and the limit
  mergebuild cache gc --keep 0    drop all but what the Mergefiles using this cache need
  mergebuild cache verify --cache-dir D:/merges/cache""",
    "clean": """examples:
  mergebuild clean                remove the outputs (only what mergebuild wrote)""",
    "methods": """examples:
  mergebuild methods              every method, one line each
  mergebuild methods ties         one method: its inputs and parameters""",
    "import": """examples:
  mergebuild import merge.yml -o mergefile.toml          a mergekit (or mergekit-multi) YAML
  mergebuild import recipe.mecha > mergefile.toml        an sd-mecha recipe
  mergebuild import merged.safetensors --models ~/sd/models -o rebuild.toml
                                  a file's own recipe, its parents found by sha256 in the folders""",
    "report": """examples:
  mergebuild report               report.html beside the Mergefile
  mergebuild report -o /tmp/lineage.html""",
    "tune": """examples:
  mergebuild tune --trials 30 --plot plots
  mergebuild tune --apply         also write the best values into the Mergefile
  mergebuild tune --greedy-soup
  mergebuild tune --ray --parallel 4   four trials at once on Ray (docs/cluster.md)""",
}
DESCRIPTIONS = {
    "build": "Build the targets and everything they need, recomputing only the tensors a change reaches.",
    "status": "Say, per target, whether a build would change its output, and why: the same answer the build uses.",
    "explain": "Per merge a target needs: how many tensors are dirty or pending, by block, and why.",
    "graph": "Show the merge DAG as text, Graphviz dot, Mermaid, or a picture.",
    "lineage": "Show how a file (or model folder) was made, from its metadata alone, across generations.",
    "inspect": "Show a file's architecture, blocks, components, dtypes, LoRA modules, metadata and hashes.",
    "diff": "Show where two models differ, per block and component (cosine, relative L2, changed share).",
    "cache": "Look after the cache: its size by kind, garbage collection, verification of every stored tensor.",
    "clean": "Remove the declared outputs: only what mergebuild wrote, never a file of yours.",
    "methods": "List the merge methods, or show one with its inputs and parameters.",
    "report": "Write one self-contained HTML page: the DAG, each merge's parameters and block weights, its last "
              "build, how far it moved from its inputs by block, each output's lineage, the cache.",
    "import": "Write a Mergefile from another tool's recipe: a mergekit YAML or mergekit-multi file, an sd-mecha .mecha "
              "recipe, or the recipe a model file records (A1111, supermerger, sd-mecha, mergebuild), with comments "
              "saying where each value came from and what could not be expressed.",
    "tune": "Search the Mergefile's open ranges with Optuna (each trial an incremental build), or make a greedy soup.",
}


def _sub(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=DESCRIPTIONS[name], epilog=EXAMPLES[name],
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _project_options(p, lock: bool = False) -> None:
    """Which Mergefile and cache (the commands that work on a project)."""
    p.add_argument("-f", "--file", type=Path, default=Path("mergefile.toml"), help="the Mergefile (default ./mergefile.toml)")
    p.add_argument("--cache-dir", type=Path, help="the cache folder (overrides MERGEBUILD_CACHE and [settings] cache)")
    p.add_argument("--remote-cache", choices=("off", "read", "readwrite", "require"), metavar="MODE",
                   help="the shared remote cache ([settings] remote_cache): off, read, readwrite (the default when "
                        "one is set) or require (unreachable is an error, exit 1)")
    if lock:
        p.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                       help="wait at most this long for another build holding the cache (default: as long as it takes)")


def _ray_option(p, what: str) -> None:
    p.add_argument("--ray", metavar="=ADDRESS", help=f"{what}; ADDRESS (after =) as ray.init takes it, "
                   "default RAY_ADDRESS, else a local Ray")


def _output_options(p, quiet: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="say more (why merges rebuild); on an error, the traceback")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergebuild", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints as a build: a DAG in mergefile.toml, a cache key per tensor, lineage in "
                    "every file.\n\n  mergebuild [build options] [TARGET...]   builds (the default command)",
        epilog="build options: -n/--dry-run  --force  --device DEV  --progress  -f/--file PATH  --cache-dir DIR\n"
               "               --remote-cache MODE  --lock-timeout SECONDS  --json  -q  -v\n"
               "               (mergebuild build --help says more)\n\n"
               "Exit codes: 0 ok, 1 the build failed, 2 a usage or Mergefile error, 130/143/129 stopped by a signal.")
    p.add_argument("--version", action="version", version=f"mergebuild {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = _sub(sub, "build", "build targets (the default command)")
    b.add_argument("targets", nargs="*", metavar="TARGET", help="merges to build (default: every merge with an output)")
    b.add_argument("-n", "--dry-run", action="store_true", help="say what would be computed, compute nothing")
    b.add_argument("--force", action="store_true", help="recompute every tensor, ignoring cached results")
    b.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides [settings] device)")
    b.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    _ray_option(b, "run the tensor tasks on a Ray cluster's workers (docs/cluster.md)")
    _project_options(b, lock=True)
    _output_options(b)
    b.set_defaults(run=commands._cmd_build)

    st = _sub(sub, "status", "what a build would change, and why")
    st.add_argument("targets", nargs="*", metavar="TARGET")
    st.add_argument("--check", action="store_true", help="exit 1 when a target is out of date (as make -q)")
    _project_options(st)
    _output_options(st)
    st.set_defaults(run=commands._cmd_status)

    ex = _sub(sub, "explain", "per merge: dirty tensors by block, and why")
    ex.add_argument("targets", nargs="*", metavar="TARGET")
    _project_options(ex)
    _output_options(ex, quiet=False)
    ex.set_defaults(run=commands._cmd_explain)

    g = _sub(sub, "graph", "show the merge DAG")
    g.add_argument("--format", choices=("text", "dot", "mermaid", "png", "svg"), default="text")
    g.add_argument("-o", "--output", type=Path, help="png/svg: the picture to write (default graph.png / graph.svg)")
    _project_options(g)
    _output_options(g, quiet=False)
    g.set_defaults(run=commands._cmd_graph)

    lin = _sub(sub, "lineage", "show how a file was made, from its metadata alone")
    lin.add_argument("path", type=Path, metavar="FILE")
    lin.add_argument("--format", choices=("tree", "mermaid", "dot"), default="tree")
    _output_options(lin, quiet=False)
    lin.set_defaults(run=commands._cmd_lineage)

    ins = _sub(sub, "inspect", "architecture, blocks, LoRA modules, metadata and hashes of a file")
    ins.add_argument("path", type=Path, metavar="FILE")
    ins.add_argument("--no-hashes", action="store_true", help="skip hashing (reads the header only)")
    _output_options(ins, quiet=False)
    ins.set_defaults(run=commands._cmd_inspect)

    d = _sub(sub, "diff", "where two models differ, per block and component")
    d.add_argument("a", type=Path, metavar="A")
    d.add_argument("b", type=Path, metavar="B")
    d.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a heatmap")
    _output_options(d, quiet=False)
    d.set_defaults(run=commands._cmd_diff)

    c = _sub(sub, "cache", "cache stats | gc | verify")
    c.add_argument("action", choices=("stats", "gc", "verify"))
    c.add_argument("--keep", type=int, help="gc: keep the entries of the last N builds, 0 or more (default [settings] keep_builds)")
    _project_options(c, lock=True)
    _output_options(c)
    c.set_defaults(run=commands._cmd_cache)

    cl = _sub(sub, "clean", "remove the declared outputs")
    cl.add_argument("targets", nargs="*", metavar="TARGET")
    cl.add_argument("-f", "--file", type=Path, default=Path("mergefile.toml"), help="the Mergefile (default ./mergefile.toml)")
    _output_options(cl)
    cl.set_defaults(run=commands._cmd_clean)

    m = _sub(sub, "methods", "list the merge methods, or show one")
    m.add_argument("name", nargs="?", metavar="METHOD", help="show this method in full")
    _output_options(m, quiet=False)
    m.set_defaults(run=commands._cmd_methods)

    r = _sub(sub, "report", "write an HTML report of the project")
    r.add_argument("-o", "--output", type=Path, help="the page to write (default report.html beside the Mergefile)")
    _project_options(r)
    _output_options(r)
    r.set_defaults(run=commands._cmd_report)

    t = _sub(sub, "tune", "search the open ranges ([tune]) or make a greedy soup ([soup])")
    t.add_argument("--trials", type=int, metavar="N", help="trials in the study in all (overrides [tune] trials)")
    t.add_argument("--apply", action="store_true", help="also write the best values into the Mergefile itself")
    t.add_argument("--plot", type=Path, metavar="DIR", help="save history.png and importances.png in DIR")
    t.add_argument("--greedy-soup", action="store_true", help="the greedy model soup of [soup] ingredients")
    t.add_argument("--no-cache", action="store_true", help="build every trial in a fresh cache (for comparisons)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides [settings] device)")
    _ray_option(t, "evaluate trials in parallel on a Ray cluster's workers (docs/cluster.md)")
    t.add_argument("--parallel", type=int, metavar="N", help="with --ray: trials at once (overrides [tune] parallel; "
                   "default: as many as the cluster fits)")
    _project_options(t)
    _output_options(t)
    t.set_defaults(run=commands._cmd_tune)

    im = _sub(sub, "import", "write a Mergefile from a mergekit, sd-mecha or A1111 recipe")
    im.add_argument("path", type=Path, metavar="FILE", help="a .yml/.yaml, a .mecha, a .safetensors or a model folder")
    im.add_argument("-o", "--output", type=Path, help="the Mergefile to write (default: print it)")
    im.add_argument("--models", type=Path, action="extend", nargs="+", default=[], metavar="DIR",
                    help="folders to look for the recipe's models in (by sha256, name or path)")
    im.add_argument("--force", action="store_true", help="replace an existing output file")
    im.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors")
    im.add_argument("-v", "--verbose", action="store_true", help="on an error, the traceback")
    im.set_defaults(run=commands._cmd_import)
    return p


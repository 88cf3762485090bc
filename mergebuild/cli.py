"""The command line, used like make. A thin layer: parse arguments, call build.py, report.

Exit codes: 0 ok, 1 the build failed, 2 usage, Mergefile or input error, 130 / 143 / 129
stopped by SIGINT / SIGTERM / SIGHUP. Every failure is one line on stderr; -v adds the traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mergebuild import __version__
from mergebuild.errors import MergebuildError, UsageError
from mergebuild.failures import Stopped, describe, install_stop_handlers

SUBCOMMANDS = ("build", "status", "explain", "graph", "lineage", "inspect", "diff", "cache", "clean", "methods", "tune",
               "report", "import")
TAKES_VALUE = {"-f", "--file", "--cache-dir", "--device", "--format", "--keep", "--trials", "--plot", "--lock-timeout",
               "-o", "--output", "--models"}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_KEEP = 10**6


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(_with_subcommand(argv))
    restore = install_stop_handlers()
    try:
        return args.run(args)
    except Stopped as e:
        _error(f"{e.why}: finished work is kept in the cache; no output was left half-written")
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted: finished work is kept in the cache; no output was left half-written")
        return 130
    except BaseException as e:  # noqa: BLE001 - one line, never a traceback (unless -v)
        if isinstance(e, SystemExit):
            raise
        message, code = describe(e)
        _error(message)
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        return code
    finally:
        restore()


def _with_subcommand(argv: list[str]) -> list[str]:
    """`mergebuild [opts] [TARGET...]` means `mergebuild build ...`, as make builds by default;
    options written before a subcommand (`mergebuild -f x.toml status`) go after it."""
    skip = False
    for i, token in enumerate(argv):
        if skip:
            skip = False
        elif token in TAKES_VALUE:
            skip = True
        elif token in ("-h", "--help", "--version"):
            return argv
        elif not token.startswith("-"):
            if token in SUBCOMMANDS:
                return [token, *argv[:i], *argv[i + 1:]]
            return ["build", *argv]
    return ["build", *argv]


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
  mergebuild tune --greedy-soup""",
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
    if lock:
        p.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                       help="wait at most this long for another build holding the cache (default: as long as it takes)")


def _output_options(p, quiet: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="say more (why merges rebuild); on an error, the traceback")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mergebuild", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge checkpoints as a build: a DAG in mergefile.toml, a cache key per tensor, lineage in "
                    "every file.\n\n  mergebuild [build options] [TARGET...]   builds (the default command)",
        epilog="build options: -n/--dry-run  --force  --device DEV  --progress  -f/--file PATH  --cache-dir DIR\n"
               "               --lock-timeout SECONDS  --json  -q  -v   (mergebuild build --help says more)\n\n"
               "Exit codes: 0 ok, 1 the build failed, 2 a usage or Mergefile error, 130/143/129 stopped by a signal.")
    p.add_argument("--version", action="version", version=f"mergebuild {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = _sub(sub, "build", "build targets (the default command)")
    b.add_argument("targets", nargs="*", metavar="TARGET", help="merges to build (default: every merge with an output)")
    b.add_argument("-n", "--dry-run", action="store_true", help="say what would be computed, compute nothing")
    b.add_argument("--force", action="store_true", help="recompute every tensor, ignoring cached results")
    b.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides [settings] device)")
    b.add_argument("--progress", action="store_true", help="draw progress bars even when stderr is not a terminal")
    _project_options(b, lock=True)
    _output_options(b)
    b.set_defaults(run=_cmd_build)

    st = _sub(sub, "status", "what a build would change, and why")
    st.add_argument("targets", nargs="*", metavar="TARGET")
    st.add_argument("--check", action="store_true", help="exit 1 when a target is out of date (as make -q)")
    _project_options(st)
    _output_options(st)
    st.set_defaults(run=_cmd_status)

    ex = _sub(sub, "explain", "per merge: dirty tensors by block, and why")
    ex.add_argument("targets", nargs="*", metavar="TARGET")
    _project_options(ex)
    _output_options(ex, quiet=False)
    ex.set_defaults(run=_cmd_explain)

    g = _sub(sub, "graph", "show the merge DAG")
    g.add_argument("--format", choices=("text", "dot", "mermaid", "png", "svg"), default="text")
    g.add_argument("-o", "--output", type=Path, help="png/svg: the picture to write (default graph.png / graph.svg)")
    _project_options(g)
    _output_options(g, quiet=False)
    g.set_defaults(run=_cmd_graph)

    lin = _sub(sub, "lineage", "show how a file was made, from its metadata alone")
    lin.add_argument("path", type=Path, metavar="FILE")
    lin.add_argument("--format", choices=("tree", "mermaid", "dot"), default="tree")
    _output_options(lin, quiet=False)
    lin.set_defaults(run=_cmd_lineage)

    ins = _sub(sub, "inspect", "architecture, blocks, LoRA modules, metadata and hashes of a file")
    ins.add_argument("path", type=Path, metavar="FILE")
    ins.add_argument("--no-hashes", action="store_true", help="skip hashing (reads the header only)")
    _output_options(ins, quiet=False)
    ins.set_defaults(run=_cmd_inspect)

    d = _sub(sub, "diff", "where two models differ, per block and component")
    d.add_argument("a", type=Path, metavar="A")
    d.add_argument("b", type=Path, metavar="B")
    d.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a heatmap")
    _output_options(d, quiet=False)
    d.set_defaults(run=_cmd_diff)

    c = _sub(sub, "cache", "cache stats | gc | verify")
    c.add_argument("action", choices=("stats", "gc", "verify"))
    c.add_argument("--keep", type=int, help="gc: keep the entries of the last N builds, 0 or more (default [settings] keep_builds)")
    _project_options(c, lock=True)
    _output_options(c)
    c.set_defaults(run=_cmd_cache)

    cl = _sub(sub, "clean", "remove the declared outputs")
    cl.add_argument("targets", nargs="*", metavar="TARGET")
    cl.add_argument("-f", "--file", type=Path, default=Path("mergefile.toml"), help="the Mergefile (default ./mergefile.toml)")
    _output_options(cl)
    cl.set_defaults(run=_cmd_clean)

    m = _sub(sub, "methods", "list the merge methods, or show one")
    m.add_argument("name", nargs="?", metavar="METHOD", help="show this method in full")
    _output_options(m, quiet=False)
    m.set_defaults(run=_cmd_methods)

    r = _sub(sub, "report", "write an HTML report of the project")
    r.add_argument("-o", "--output", type=Path, help="the page to write (default report.html beside the Mergefile)")
    _project_options(r)
    _output_options(r)
    r.set_defaults(run=_cmd_report)

    t = _sub(sub, "tune", "search the open ranges ([tune]) or make a greedy soup ([soup])")
    t.add_argument("--trials", type=int, metavar="N", help="trials in the study in all (overrides [tune] trials)")
    t.add_argument("--apply", action="store_true", help="also write the best values into the Mergefile itself")
    t.add_argument("--plot", type=Path, metavar="DIR", help="save history.png and importances.png in DIR")
    t.add_argument("--greedy-soup", action="store_true", help="the greedy model soup of [soup] ingredients")
    t.add_argument("--no-cache", action="store_true", help="build every trial in a fresh cache (for comparisons)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (overrides [settings] device)")
    _project_options(t)
    _output_options(t)
    t.set_defaults(run=_cmd_tune)

    im = _sub(sub, "import", "write a Mergefile from a mergekit, sd-mecha or A1111 recipe")
    im.add_argument("path", type=Path, metavar="FILE", help="a .yml/.yaml, a .mecha, a .safetensors or a model folder")
    im.add_argument("-o", "--output", type=Path, help="the Mergefile to write (default: print it)")
    im.add_argument("--models", type=Path, action="extend", nargs="+", default=[], metavar="DIR",
                    help="folders to look for the recipe's models in (by sha256, name or path)")
    im.add_argument("--force", action="store_true", help="replace an existing output file")
    im.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors")
    im.add_argument("-v", "--verbose", action="store_true", help="on an error, the traceback")
    im.set_defaults(run=_cmd_import)
    return p


def _options(args):
    from mergebuild.project import BuildOptions

    device = getattr(args, "device", None)
    if device is not None and not DEVICE.match(device):
        raise UsageError(f"--device {device!r}: expected auto, cpu, mps, cuda or cuda:N")
    timeout = getattr(args, "lock_timeout", None)
    if timeout is not None and not 0 <= timeout <= 10**7:
        raise UsageError(f"--lock-timeout takes seconds, 0 or more, got {timeout:g}")
    return BuildOptions(
        mergefile=args.file,
        targets=tuple(getattr(args, "targets", ()) or ()),
        force=getattr(args, "force", False),
        cache_dir=getattr(args, "cache_dir", None),
        device=device,
        lock_timeout=timeout,
    )


def _waiting(holder: str) -> None:
    from mergebuild.render import console as report

    report.err.print(f"waiting for {holder or 'another build'} to release the cache...", markup=False, highlight=False)


def _cmd_build(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    opts = _options(args)
    if args.dry_run:
        plan, statuses, warnings = build.dry_run_with_warnings(opts)
        report.print_warnings(plan, warnings)  # even with -q: an edit that does nothing is worth a line
        if args.json:
            report.print_json(report.dry_run_json(statuses))
        elif not args.quiet:
            report.print_plan_notes(plan)
            report.print_dry_run(statuses, args.verbose)
        return 0

    def on_plan(plan, reasons, warnings):
        report.print_warnings(plan, warnings)
        if not args.quiet:
            report.print_plan(plan, reasons, args.verbose)

    with report.RichProgress(enabled=not args.quiet, force=args.progress) as progress:
        _plan, results, built = build.build_with_report(opts, progress, on_plan, None if args.quiet else _waiting)
    report.print_warnings(None, built.late_warnings)
    if not args.quiet:
        report.err.print(report.summary_table(results))
        report.err.print(report.cache_line(built.cache_bytes, built.cache_limit), markup=False)
    if args.json:
        report.print_json(report.build_json(results, built))
    return 0


def _cmd_status(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    reasons = build.check_status(_options(args))
    if args.json:
        report.print_json({"targets": {t: {"up_to_date": not r, "reasons": r} for t, r in reasons.items()}})
    elif not args.quiet:
        report.print_status(reasons)
    return 1 if args.check and any(reasons.values()) else 0


def _cmd_explain(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    doc = build.explain_target(_options(args))
    if args.json:
        report.print_json({"merges": doc})
    else:
        report.print_explain(doc)
    return 0


def _states(opts) -> dict[str, str]:
    """Each merge's state from a dry run, for pictures; none where a source cannot be read."""
    from mergebuild import project
    from mergebuild.errors import InputError
    from mergebuild.render import console as report

    try:
        _plan, statuses = project.dry_run(opts)
    except InputError as e:  # a source is missing: still draw the DAG, without states
        report.err.print(f"note: no tensor states ({e})", markup=False)
        return {}
    return {s.name: s.state for s in statuses}


def _cmd_graph(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report, graph as graphviz

    opts = _options(args)
    mf = build.load_mergefile(opts.mergefile)
    states = _states(opts)
    if args.json:
        nodes, edges = graphviz.to_nodes(mf, states)
        report.print_json({"nodes": [{**n, "state": states.get(n["name"], n["state"])} for n in nodes],
                           "edges": [list(e) for e in edges]})
        return 0
    if args.format in ("png", "svg"):
        path = args.output or Path(f"graph.{args.format}")
        from mergebuild.render import plots as plotting

        if not plotting.render_dot(graphviz.to_dot(mf, states), path):
            plotting.plot_graph(*graphviz.to_nodes(mf, states), path)
        report.err.print(f"wrote {path}", markup=False)
        return 0
    render = {"dot": graphviz.to_dot, "mermaid": graphviz.to_mermaid, "text": graphviz.to_text}[args.format]
    sys.stdout.write(render(mf, states))
    return 0


def _cmd_lineage(args) -> int:
    from mergebuild.render import console as report
    from mergebuild.record.lineage import read_lineage

    tree = read_lineage(args.path)
    for warning in tree.pop("warnings", []):
        report.err.print(f"warning: {warning}", markup=False, highlight=False)
    if args.json:
        report.print_json(tree)
    elif args.format != "tree":
        from mergebuild.render import graph as graphviz

        render = graphviz.lineage_to_dot if args.format == "dot" else graphviz.lineage_to_mermaid
        sys.stdout.write(render(tree))
    elif tree["made_by"] is None:
        report.out.print(f"{args.path}: no lineage recorded (not made by mergebuild or an A1111-family merger)")
    else:
        report.out.print(report.lineage_tree(tree))
    return 0


def _cmd_inspect(args) -> int:
    from mergebuild.render import console as report
    from mergebuild.analyze.inspect import inspect_file

    doc = inspect_file(args.path, hashes=not args.no_hashes)
    if args.json:
        report.print_json(doc)
    else:
        report.print_inspect(doc)
    return 0


def _cmd_diff(args) -> int:
    from mergebuild.render import console as report
    from mergebuild.analyze.diff import diff_files

    doc = diff_files(args.a, args.b)
    if args.plot:
        from mergebuild.render.plots import plot_diff

        plot_diff(doc, args.plot)
        report.err.print(f"wrote {args.plot}", markup=False)
    if args.json:
        report.print_json(doc)
    else:
        report.print_diff(doc)
    return 0


def _cmd_cache(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    opts = _options(args)
    if args.keep is not None and (args.action != "gc" or not 0 <= args.keep <= MAX_KEEP):
        raise UsageError(f"--keep takes a number of builds from 0 to {MAX_KEEP:,} (with cache gc), got {args.keep}")
    if args.action == "stats":
        doc = build.cache_stats(opts)
        text = report.cache_stats_text(doc)
    elif args.action == "gc":
        doc = build.collect_garbage(opts, args.keep)
        text = f"removed {doc['entries_removed']} entries and {doc['blobs_removed']} blobs, freed {report.human_bytes(doc['bytes_freed'])}"
    else:
        doc = build.verify_cache(opts)
        text = report.verify_text(doc)
    if args.json:
        report.print_json(doc)
    elif not args.quiet:
        report.out.print(text)
    return 0


def _cmd_clean(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    removed, kept = build.clean(_options(args))
    if args.json:
        report.print_json({"removed": [str(p) for p in removed], "kept": kept})
    elif not args.quiet:
        for p in removed:
            report.out.print(f"removed {p}", markup=False)
        for k in kept:
            report.out.print(f"kept {k}: not written by mergebuild", markup=False)
    return 0


def _cmd_methods(args) -> int:
    from mergebuild.methods import all_methods
    from mergebuild.methods.registry import get_method, suggest
    from mergebuild.render import console as report

    if args.name is not None:
        method = get_method(args.name)
        if method is None:
            raise UsageError(f"unknown method {args.name!r}{suggest(args.name)} (mergebuild methods lists them)")
        if args.json:
            report.print_json(report.method_doc(method))
        else:
            report.print_method(method)
        return 0
    methods = all_methods()
    if args.json:
        report.print_json({m.name: {"version": m.version, "inputs": list(m.inputs),
                                    "params": {p.name: None if p.required else p.default for p in m.params}}
                           for m in methods})
        return 0
    report.print_methods(methods)
    return 0


def _cmd_report(args) -> int:
    import tempfile

    from mergebuild import project
    from mergebuild.render import console as report
    from mergebuild.render import graph as graphviz
    from mergebuild.render import plots
    from mergebuild.render.html import write_report

    opts = _options(args)
    mf, runs, usage, limit = project.report_data(opts)
    path = args.output or mf.path.with_name("report.html")
    states = _states(opts)  # headers and file stamps only: no tensor is read
    with tempfile.TemporaryDirectory() as tmp:  # the DAG drawn as SVG, inlined into the page
        svg = Path(tmp) / "dag.svg"
        plots.plot_graph(*graphviz.to_nodes(mf, states), svg)
        dag = svg.read_text(encoding="utf-8")
    dag = dag[dag.find("<svg"):] if "<svg" in dag else None  # without the XML prologue
    written = write_report(mf, runs, usage, limit, path, dag)
    if args.json:
        report.print_json({"report": str(written), "merges": len(mf.merges), "built": sorted(runs)})
    elif not args.quiet:
        report.err.print(f"wrote {written}", markup=False)
    return 0


def _cmd_import(args) -> int:
    from mergebuild.record.foreign import import_recipe
    from mergebuild.render import console as report

    target = args.output
    if target is not None and (target.exists() or target.is_symlink()) and not args.force:
        raise UsageError(f"{target} exists: pass --force to replace it")
    if target is not None and target.is_dir():
        raise UsageError(f"{target} is a folder: name the Mergefile to write")
    text, draft = import_recipe(args.path, list(args.models), target or Path.cwd() / "mergefile.toml")
    for line in draft.unexpressed:
        report.err.print(f"warning: not expressible: {line}", markup=False, highlight=False, soft_wrap=True)
    for line in draft.missing:
        report.err.print(f"warning: parent not found: {line}", markup=False, highlight=False, soft_wrap=True)
    for line in draft.differences:
        report.err.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)
    if target is None:
        sys.stdout.write(text)
        return 0
    from mergebuild.portable import replace

    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.import-tmp")
    temp.write_text(text, encoding="utf-8")
    replace(temp, target)
    if not args.quiet:
        models, merges = len(draft.models), len(draft.merges)
        report.err.print(f"wrote {target}: {models} model{'s' * (models != 1)}, {merges} merge{'s' * (merges != 1)}"
                         + (f"; {len(draft.unexpressed)} parts not expressible (listed at its top)" if draft.unexpressed
                            else ""), markup=False, highlight=False)
    return 0


def _cmd_tune(args) -> int:
    from mergebuild.render import console as report
    from mergebuild.errors import UsageError
    from mergebuild.tune import TuneOptions, run_greedy_soup, run_tune

    if args.trials is not None and args.trials < 0:
        raise UsageError(f"--trials takes a number >= 0, got {args.trials}")
    if args.greedy_soup and (args.trials is not None or args.apply or args.plot):
        raise UsageError("--greedy-soup takes no --trials, --apply or --plot")
    opts = TuneOptions(mergefile=args.file, cache_dir=args.cache_dir, trials=args.trials, apply=args.apply,
                       plot=args.plot, no_cache=args.no_cache, quiet=args.quiet, device=args.device)
    doc, code = (run_greedy_soup if args.greedy_soup else run_tune)(opts)
    if args.json:
        report.print_json(doc)
    return code


def _error(message: str) -> None:
    from rich.markup import escape

    from mergebuild.render import console as report

    # soft_wrap: one line whatever its length, on a terminal or through a pipe
    report.err.print(f"[bold red]mergebuild: error:[/] {escape(' '.join(message.split()))}", highlight=False,
                     soft_wrap=True)

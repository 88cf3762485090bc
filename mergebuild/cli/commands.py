"""What each subcommand does: a thin layer over mergebuild.project and the renderers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mergebuild.errors import UsageError

DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_KEEP = 10**6


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
        remote_cache=getattr(args, "remote_cache", None),
        ray=getattr(args, "ray", None),
    )


def _tails(opts, dry: bool):
    from mergebuild.api import resolved_tails

    return resolved_tails(opts, dry)


def _waiting(holder: str) -> None:
    from mergebuild.render import console as report

    report.err.print(f"waiting for {holder or 'another build'} to release the cache...", markup=False, highlight=False)


def _cmd_build(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    opts, tails = _tails(_options(args), args.dry_run)
    if args.dry_run:
        plan, statuses, warnings = build.dry_run_with_warnings(opts)
        for s in statuses:  # k not known yet (its candidates to build): no "k: 5 -> 0" line
            if s.name in tails and tails[s.name].k is None:
                s.reasons = [r for r in s.reasons if not r.startswith(f"{s.name}.k: ")]
        report.print_warnings(plan, warnings)  # even with -q: an edit that does nothing is worth a line
        if args.json:
            report.print_json({**report.dry_run_json(statuses), **_tails_json(tails)})
        elif not args.quiet:
            report.print_plan_notes(plan)
            report.print_dry_run(statuses, args.verbose)
            for choice in tails.values():
                report.out.print(choice.line(), markup=False, highlight=False)
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
        for choice in tails.values():
            report.err.print(choice.line(), markup=False, highlight=False)
        report.err.print(report.cache_line(built.cache_bytes, built.cache_limit), markup=False)
        if built.ray is not None:
            report.err.print(report.ray_line(built.ray), markup=False, highlight=False)
    if args.json:
        report.print_json({**report.build_json(results, built), **_tails_json(tails)})
    return 0


def _tails_json(tails: dict) -> dict:
    """--json's record of what k = "auto" chose, per merge (absent when no merge has it)."""
    if not tails:
        return {}
    return {"tails": {n: {**c.doc(), "computed": c.computed, "evaluated": c.evaluated, "pending": c.unknown,
                          "steps": c.steps} for n, c in tails.items()}}


def _cmd_status(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    reasons = build.check_status(_tails(_options(args), dry=True)[0])
    if args.json:
        report.print_json({"targets": {t: {"up_to_date": not r, "reasons": r} for t, r in reasons.items()}})
    elif not args.quiet:
        report.print_status(reasons)
    return 1 if args.check and any(reasons.values()) else 0


def _cmd_explain(args) -> int:
    from mergebuild import project as build
    from mergebuild.render import console as report

    doc = build.explain_target(_tails(_options(args), dry=True)[0])
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
        _plan, statuses = project.dry_run(_tails(opts, dry=True)[0])
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
    from mergebuild.record.lineage_read import read_lineage

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
        from mergebuild.render.files_text import print_inspect

        print_inspect(doc)
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
        from mergebuild.render.files_text import print_diff

        print_diff(doc)
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
    if args.parallel is not None and (args.ray is None or args.parallel < 1):
        raise UsageError("--parallel N takes a number >= 1, with --ray" if args.ray is not None else
                         "--parallel runs trials on Ray workers: give --ray too")
    if args.greedy_soup and args.ray is not None:
        raise UsageError("--greedy-soup runs on this machine: it takes no --ray")
    opts = TuneOptions(mergefile=args.file, cache_dir=args.cache_dir, trials=args.trials, apply=args.apply,
                       plot=args.plot, no_cache=args.no_cache, quiet=args.quiet, device=args.device,
                       ray=args.ray, parallel=args.parallel)
    doc, code = (run_greedy_soup if args.greedy_soup else run_tune)(opts)
    if args.json:
        report.print_json(doc)
    return code


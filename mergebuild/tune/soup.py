"""The greedy model soup (Wortsman et al. 2022, "Model soups", Algorithm 1).

Score every ingredient alone; sort them best first; start the soup with the best one, then add
each next ingredient if the uniform average of soup + ingredient scores at least as well as the
soup (>= when maximizing, <= when minimizing: the paper's rule). Every candidate soup is an
incremental build of a generated Mergefile with one `soup` merge.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mergebuild.project import BuildOptions, cache_dir
from mergebuild.errors import BuildError
from mergebuild.render.console import err
from mergebuild.mergefile.parse import load_mergefile
from mergebuild.tune.config import check_python_scorer, soup_config
from mergebuild.tune.display import fmt
from mergebuild.tune.runner import Runner
from mergebuild.tune.scoring import Scorer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MERGE = "greedy_soup"


def soup_text(mf, original_text: str, ingredients: list[str], output: Path, merge: str = MERGE) -> str:
    """A Mergefile with the original [settings], the ingredients and one soup merge."""
    import tomlkit

    doc = tomlkit.document()
    settings = tomllib.loads(original_text).get("settings")
    if settings:
        doc["settings"] = settings
    models = tomlkit.table(is_super_table=True)
    for name in dict.fromkeys(ingredients):
        entry = tomlkit.table()
        entry["path"] = str(mf.models[name].path)
        models[name] = entry
    doc["models"] = models
    merges = tomlkit.table(is_super_table=True)
    entry = tomlkit.table()
    entry["method"] = "soup"
    entry["inputs"] = list(ingredients)
    entry["output"] = str(Path(output).absolute())
    merges[merge] = entry
    doc["merges"] = merges
    return tomlkit.dumps(doc)


def greedy_soup(opts) -> tuple[dict, int]:
    path = Path(opts.mergefile)
    mf = load_mergefile(path, allow_search=True)
    text = path.read_text(encoding="utf-8")
    cfg = soup_config(mf)
    check_python_scorer(mf, cfg.scorer, "soup")
    cache = cache_dir(mf, BuildOptions(cache_dir=opts.cache_dir))
    merge = MERGE if MERGE not in cfg.ingredients else f"{MERGE}_"
    scorer = Scorer(cfg.scorer, None if opts.no_cache else cache)
    runner = Runner(mf.path, cache, scorer, fresh_cache=opts.no_cache, device=opts.device, tag="soup")

    def say(line: str) -> None:
        if not opts.quiet:
            err.print(line, markup=False, highlight=False, soft_wrap=True)

    try:
        scores, failed = {}, {}
        for name in cfg.ingredients:
            ev = runner.score_file(mf.models[name].path)
            if ev.ok:
                scores[name] = ev.value
                say(f"{name}: {fmt(ev.value)}" + (" (cached score)" if ev.score.cached else ""))
            else:
                failed[name] = ev.error
                say(f"{name}: FAIL: {ev.error}" + (f"\n{ev.tail}" if ev.tail else ""))
        if not scores:
            raise BuildError("greedy soup: no ingredient could be scored (see the errors above)")
        order = sorted(scores, key=scores.get, reverse=cfg.scorer.maximize)  # stable: ties keep the listed order
        soup, value = [order[0]], scores[order[0]]
        steps = [{"ingredients": list(soup), "value": value, "accepted": True}]
        say(f"soup = [{order[0]}]: {fmt(value)}")
        for name in order[1:]:
            candidate = soup + [name]
            ev = runner.evaluate(soup_text(mf, text, candidate, cfg.output, merge), merge)  # into runner.scratch
            accepted = ev.ok and cfg.scorer.better_or_equal(ev.value, value)
            step = {"ingredients": candidate, "value": ev.value, "accepted": accepted,
                    "computed": ev.computed, "reused": ev.reused, "seconds": round(ev.seconds, 3)}
            if ev.error:
                step["error"] = ev.error
            steps.append(step)
            verdict = "kept" if accepted else "left out"
            result = fmt(ev.value) if ev.ok else f"FAIL: {ev.error}"
            say(f"+ {name}: {result} vs {fmt(value)}: {verdict}")
            if accepted:
                soup, value = candidate, ev.value
        # only now the real output: it holds the chosen soup (a soup of one model twice is that model)
        final = soup if len(soup) > 1 else soup * 2
        runner.build(soup_text(mf, text, final, cfg.output, merge), merge)
    finally:
        scorer.close()
        runner.close()
    say(f"greedy soup: {', '.join(soup)} -> {fmt(value)}; wrote {cfg.output}")
    doc = {"ingredients": soup, "scores": scores, "value": value, "steps": steps, "output": str(cfg.output)}
    if failed:
        doc["failed"] = failed
    return doc, 0

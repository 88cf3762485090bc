"""What `mergebuild tune` shows: a live table of trials on stderr (a line per trial when stderr is
not a terminal), the JSON document, and the plots."""

from __future__ import annotations

from pathlib import Path

from rich.live import Live
from rich.markup import escape
from rich.table import Table

from mergebuild.render.console import err
from mergebuild.tune.study import INTERRUPTED, TRIAL_ATTR, clean_params

LIVE_ROWS = 20


def short(rid: str) -> str:
    return rid.removeprefix("merges.")


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def trial_doc(t, rounding=clean_params) -> dict:
    """One trial in --json: number, params, value, state, computed, reused, seconds (+ why it failed).
    `rounding` (study.rounder) turns Optuna's raw params into the values the trial built."""
    a = t.user_attrs.get(TRIAL_ATTR, {})
    doc = {"number": t.number, "params": rounding(t.params), "value": t.value, "state": t.state.name,
           "computed": a.get("computed"), "reused": a.get("reused"), "seconds": a.get("seconds")}
    if "score_cached" in a:
        doc["score_cached"] = a["score_cached"]
    if a.get("error"):
        doc["error"] = a["error"]
        doc["stderr"] = a.get("stderr", "")
    if t.user_attrs.get(INTERRUPTED):
        doc["interrupted"] = True
    if "ray" in t.user_attrs:  # tune --ray: the worker process, its start and end (ray_runner.py)
        doc["ray"] = t.user_attrs["ray"]
    return doc


class TrialView:
    """Rows of trials as they finish. Modes: live (a terminal), lines (a pipe or a log), quiet."""

    def __init__(self, range_ids: list[str], maximize: bool, quiet: bool):
        self.ids = range_ids
        self.maximize = maximize
        self.rows: list[dict] = []
        if quiet:
            self.mode = "quiet"
        else:
            self.mode = "live" if err.is_terminal and not err.is_dumb_terminal else "lines"
        self._live = None

    def __enter__(self):
        if self.mode == "live":
            self._live = Live(self._table(), console=err, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._live.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.mode != "quiet":
            err.print(escape(text), soft_wrap=True)

    def add(self, row: dict, earlier: bool = False) -> None:
        self.rows.append(row)
        if self.mode == "live":
            self._live.update(self._table())
        elif self.mode == "lines" and not earlier:
            err.print(escape(self._line(row)), soft_wrap=True)

    def _best(self) -> int | None:
        done = [r for r in self.rows if r["state"] == "COMPLETE" and r["value"] is not None]
        if not done:
            return None
        pick = max if self.maximize else min
        return pick(done, key=lambda r: r["value"])["number"]

    def _line(self, row: dict) -> str:
        params = "  ".join(f"{short(k)}={fmt(v)}" for k, v in row["params"].items())
        if row["state"] == "COMPLETE":
            cached = " (cached score)" if row.get("score_cached") else ""
            result = f"score {fmt(row['value'])}{cached}"
        else:
            result = f"{row['state']}: {row.get('error') or ''}".rstrip(": ")
            lines = (row.get("stderr") or "").strip().splitlines()
            if lines:
                result += f" ({lines[-1].strip()[:200]})"
        work = ""
        if row.get("computed") is not None:
            work = f"  computed {row['computed']}, reused {row['reused']}"
        secs = f"  {row['seconds']:.2f} s" if row.get("seconds") is not None else ""
        return f"trial {row['number']}  {params}  {result}{work}{secs}"

    def _table(self) -> Table:
        table = Table(title="mergebuild tune", title_justify="left")
        table.add_column("#", justify="right")
        for rid in self.ids:
            table.add_column(short(rid), justify="right")
        for col in ("score", "state", "computed", "reused", "seconds"):
            table.add_column(col, justify="left" if col == "state" else "right")
        best = self._best()
        rows = self.rows[-LIVE_ROWS:]
        if len(self.rows) > LIVE_ROWS:
            table.caption = f"{len(self.rows) - LIVE_ROWS} earlier trials not shown"
        for row in rows:
            state = row["state"].lower()
            if row["state"] == "FAIL" and row.get("error"):
                state = f"fail: {row['error'][:60]}"
            if row.get("score_cached"):
                state += " (cached score)"
            mark = " *" if row["number"] == best else ""
            table.add_row(
                f"{row['number']}{mark}", *(fmt(row["params"].get(rid)) for rid in self.ids),
                fmt(row["value"]), escape(state), fmt(row.get("computed")), fmt(row.get("reused")),
                "" if row.get("seconds") is None else f"{row['seconds']:.2f}",
                style="bold" if mark else None,
            )
        return table


def write_plots(study, n_params: int, folder: Path) -> tuple[list[Path], list[str]]:
    """history.png always; importances.png with >= 2 parameters and >= 3 completed trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if completed == 0:
        return written, ["no plots: no trial completed"]
    ax = plot_optimization_history(study)
    path = folder / "history.png"
    ax.figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(ax.figure)
    written.append(path)
    if n_params < 2 or completed < 3:
        notes.append("no importances.png: it needs two or more searched parameters and three completed trials")
        return written, notes
    try:
        ax = plot_param_importances(study, evaluator=_evaluator())
        path = folder / "importances.png"
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        written.append(path)
    except Exception as e:  # noqa: BLE001 (a degenerate study: all scores equal, ...)
        notes.append(f"no importances.png: {type(e).__name__}: {e}")
    return written, notes


def _evaluator():
    import importlib.util

    from optuna import importance

    if importlib.util.find_spec("sklearn") is not None:
        return importance.FanovaImportanceEvaluator(seed=0)
    return importance.PedAnovaImportanceEvaluator()

"""`mergebuild report`: one self-contained HTML page, made from what builds recorded (so it works
with the models gone), checked in its structure and in a real headless browser."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import chain, mergefile, run_cli

BLOCKS = chain().replace("alpha = 0.25", 'alpha = { default = 0.25, IN01 = 0.75 }\ndtype = "float16"') + \
    '[[merges.final.rules]]\nmatch = "proj_in"\nalpha = 0.6\n'  # last: a table after the output


class Page(HTMLParser):
    """What a test needs of the page: elements with their attributes, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.elements if "id" in a}

    def tags(self, name: str) -> list[dict]:
        return [a for t, a in self.elements if t == name]


def _report(project) -> Page:
    mergefile(project / "mergefile.toml", BLOCKS)
    run_cli(cwd=project, check=True)
    for source in (project / "models").glob("*.safetensors"):
        source.unlink()  # the report reads what builds recorded, never a model
    run_cli("report", cwd=project, check=True)
    return Page((project / "report.html").read_text())


def test_the_report_holds_every_merge_its_weights_its_changes_and_the_lineage(project):
    page = _report(project)
    text = " ".join(page.text)
    assert {"merge-mix1", "merge-mix2", "merge-final"} <= page.ids()
    assert "match [proj_in]: alpha=0.6" in text  # the merge's card
    assert "[dtype float16, rule match [proj_in]: alpha=0.6]" in text  # its lineage
    assert "alpha by block" in text.replace("\n", " ") or "by block" in text
    curves = [s for s in page.tags("svg") if s.get("aria-label") == "alpha by block"]
    assert len(curves) == 1  # final's block table drawn as a curve
    heat = [t for t in page.tags("table") if t.get("class") == "heat"]
    assert len(heat) == 3  # every merge, against its inputs, by block
    assert "final.safetensors" in text and "weighted_sum" in text and "real.safetensors" in text  # lineage
    assert "of 50.0 GB" in text  # the cache: its size and limit
    assert not page.tags("script") and not page.tags("link") and not page.tags("img")  # self-contained
    fetched = [v for _, a in page.elements for k, v in a.items() if k in ("src", "href") and v and "://" in v]
    assert fetched == []  # nothing to fetch (the SVG's xmlns URIs are names, not requests)


def test_a_project_never_built_has_a_report_too(project):
    mergefile(project / "mergefile.toml", chain())
    proc = run_cli("report", "-o", project / "out.html", cwd=project, check=True)
    assert "wrote" in proc.stderr
    text = " ".join(Page((project / "out.html").read_text()).text)
    assert "not built yet" in text and "never" in text


def test_the_dag_shows_each_merge_state_as_a_dry_run_sees_it(project):
    from mergebuild.render.graph import STATE_COLOURS

    mergefile(project / "mergefile.toml", chain())
    run_cli(cwd=project, check=True)
    run_cli("report", cwd=project, check=True)
    dag = (project / "report.html").read_text().lower()
    assert dag.count(STATE_COLOURS["up to date"]) > 1  # built: merges drawn up to date, not just the legend
    built = dag.count(STATE_COLOURS["up to date"])
    mergefile(project / "mergefile.toml", chain().replace("alpha = 0.25", "alpha = 0.35"))
    run_cli("report", cwd=project, check=True)
    edited = (project / "report.html").read_text().lower()
    assert edited.count(STATE_COLOURS["dirty"]) > dag.count(STATE_COLOURS["dirty"])  # the edited merge
    assert edited.count(STATE_COLOURS["up to date"]) < built


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium: found, or installed where the machine lets the tests (root, apt)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, env=env, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium here, and it cannot be installed")
    return found


def _browser(chromium: str, tmp: Path, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def test_the_report_renders_in_a_real_browser(project, chromium, tmp_path):
    _report(project)
    url = (project / "report.html").as_uri()
    dom = _browser(chromium, tmp_path, "--dump-dom", url).stdout
    assert "merge-final" in dom and "<svg" in dom and "heat" in dom
    shot = tmp_path / "report.png"
    _browser(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] == 1600 and pixels.shape[1] == 1200
    assert pixels[..., :3].std() > 0.05  # not a blank page
    reds = ((pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.85) & (pixels[..., 2] < 0.85)).sum()
    assert reds > 100  # the heatmap's cells are drawn

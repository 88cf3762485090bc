"""What the CLI prints, as a user sees it: at 80 columns, piped, and in a pseudo-terminal.
Nothing is cropped (no "…" in a path or a value), nothing wraps inside a value off a terminal,
and a terminal gets lines that fit it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SIM, chain, mergefile

LONG = chain().replace('output = "out/final.safetensors"',
                       'output = "out/a-rather-long-output-name-that-does-not-fit-a-narrow-table.safetensors"')
MBW = [round(0.0371 * i + 0.0123, 4) for i in range(26)]  # a 26-value block list: every value is the recipe


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MERGEBUILD_CACHE", "COLUMNS")}
    env.update(NO_COLOR="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(SIM)]), **extra)
    return env


def _piped(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergebuild", *map(str, args)], cwd=cwd, env=_env(COLUMNS="80"),
                          capture_output=True, text=True, timeout=300)


def _in_terminal(cwd, *args, columns: int = 80) -> str:
    """The CLI run on a pseudo-terminal of `columns` columns: what the user sees."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "mergebuild", *map(str, args)], cwd=cwd, env=_env(TERM="xterm"),
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace").replace("\r", "")


@pytest.mark.slow
def test_piped_output_is_never_cut(project):
    mergefile(project / "mergefile.toml", LONG.replace("alpha = 0.4", f"alpha = {MBW}"))
    build = _piped(project)
    assert build.returncode == 0, build.stderr
    assert "out/a-rather-long-output-name-that-does-not-fit-a-narrow-table.safetensors" in build.stderr
    assert "…" not in build.stderr
    out = project / "out/a-rather-long-output-name-that-does-not-fit-a-narrow-table.safetensors"
    lineage = _piped(project, "lineage", out)
    assert "…" not in lineage.stdout and all(len(line) < 400 for line in lineage.stdout.splitlines())
    assert any(line.strip().startswith("└── final: weighted_sum(alpha=0.25)") for line in lineage.stdout.splitlines())
    assert all(str(v) in lineage.stdout for v in MBW)  # mix1's whole block list, none dropped
    error = _piped(project, "-f", "nope/" + "deep/" * 30 + "mergefile.toml")
    lines = error.stderr.strip().splitlines()
    assert error.returncode == 2 and len(lines) == 1 and len(lines[0]) > 80  # one line, not wrapped at 80


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is a Unix thing")
def test_a_terminal_gets_lines_that_fit_and_whole_paths(project):
    mergefile(project / "mergefile.toml", LONG)
    import re

    seen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", _in_terminal(project, columns=80))  # colours and cursor moves
    table = [line for line in seen.splitlines() if line.startswith(("┃", "│", "┏", "└"))]
    assert table and all(len(line) <= 80 for line in table), "\n".join(table)
    assert "…" not in seen  # the long path folds onto more lines rather than losing its end
    folded = "".join(line.rsplit("│", 2)[-2].strip() for line in table if line.startswith("│") and "│" in line[1:])
    assert "a-rather-long-output-name-that-does-not-fit-a-narrow-table.safetensors" in folded.replace(" ", "")

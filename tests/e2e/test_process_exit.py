"""The console script ends without the interpreter's teardown (cli.exit_now): the output must
still be whole, the exit code kept, atexit handlers run, the per-user store closed, and a thread
still at work waited for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, SIM, chain, mergefile


def _env(home: Path) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe buffers, as for users
    return {**environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SIM)]), "MERGEBUILD_HOME": str(home),
            "NO_COLOR": "1"}


def _python(code: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(home), capture_output=True, text=True,
                          timeout=300)


def test_a_build_through_the_console_entry_answers_whole_and_leaves_the_store_closed(project, tmp_path):
    mergefile(project / "mergefile.toml", chain())
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "mergebuild", "--json", "-q"], cwd=project, env=_env(home),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole document arrived through the pipe
    assert doc["merges"]["final"]["computed"] > 0
    assert (home / "fingerprints.sqlite").exists()
    assert not [p.name for p in home.iterdir() if p.name.endswith(("-wal", "-shm", "-journal"))]
    again = subprocess.run([sys.executable, "-m", "mergebuild", "status", "--json"], cwd=project, env=_env(home),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and all(t["up_to_date"] for t in json.loads(again.stdout)["targets"].values())


def test_a_failed_build_keeps_its_exit_code(project, tmp_path):
    mergefile(project / "mergefile.toml", chain().replace("models/base.safetensors", "models/missing.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "mergebuild", "-q"], cwd=project, env=_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing.safetensors" in proc.stderr


def test_atexit_handlers_run_and_buffered_output_is_flushed(tmp_path):
    marker = tmp_path / "atexit-ran"
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
            "import torch\n"  # the teardown exit_now skips is torch's
            "from mergebuild.cli import exit_now\n"
            "print('first'); sys.stdout.write('x' * 100000); print('last')\n"  # 'last' is still in the buffer
            "exit_now(3)\n")
    proc = _python(code, tmp_path, tmp_path / "home")
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "first\n" + "x" * 100000 + "last\n"
    assert marker.read_text() == "ran"


def test_a_thread_still_at_work_is_waited_for(tmp_path):
    marker = tmp_path / "thread-done"
    code = ("import threading, time\n"
            "from mergebuild.cli import exit_now\n"
            f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, 'w').write('done'))).start()\n"
            "exit_now(4)\n")
    proc = _python(code, tmp_path, tmp_path / "home")
    assert proc.returncode == 4, proc.stderr
    assert marker.read_text() == "done"


def test_a_closed_pipe_is_no_traceback(project, tmp_path):
    mergefile(project / "mergefile.toml", chain())
    shell = f"{sys.executable} -m mergebuild status --json | head -c 1"
    proc = subprocess.run(["sh", "-c", shell], cwd=project, env=_env(tmp_path / "home"), capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout == "{"
    assert "Traceback" not in proc.stderr

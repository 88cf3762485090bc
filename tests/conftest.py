"""Shared fixtures: tiny real safetensors models under tmp_path, and a runner for the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIM = Path(__file__).resolve().parent / "sim"  # its sitecustomize applies MERGEBUILD_SIMULATE in child processes
if os.environ.get("MERGEBUILD_SIMULATE") and not os.environ.get("MERGEBUILD_SIMULATED"):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from simulate import apply

    apply(os.environ["MERGEBUILD_SIMULATE"])

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def write_model(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def small_model(seed: int, dtype=torch.float16, extra: dict | None = None) -> dict:
    """A few SD1 keys (enough to be detected as SD1): convs, a linear, norms, an int buffer and a
    scheduler buffer."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(8, 8, generator=g),
        "model.diffusion_model.input_blocks.11.0.in_layers.0.weight": torch.randn(8, generator=g),
        "model.diffusion_model.out.0.bias": torch.randn(8, generator=g),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(16, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(4, 4, 3, 3, generator=g),
    }
    t = {k: v.to(dtype) for k, v in t.items()}
    t["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    t["alphas_cumprod"] = torch.linspace(0.99, 0.01, 10, dtype=torch.float32) + seed
    t.update(extra or {})
    return t


def mergefile(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(*args, cwd: Path, env: dict | None = None, check: bool = False, timeout: float = 300):
    """The CLI on real files: in this process (no interpreter start-up per call; `main` is what
    the console script runs), or as a process of its own for `tune`, whose scorers are modules
    the user names (they must not stay imported between tests)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MERGEBUILD_CACHE", "MERGEBUILD_REMOTE_CACHE")}
    paths = [str(ROOT), str(SIM)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    full_env.update(NO_COLOR="1", PYTHONPATH=os.pathsep.join(paths), COLUMNS="200", SOURCE_DATE_EPOCH="1790000000")
    full_env.update(env or {})
    args = [str(a) for a in args]
    if args and args[0] == "tune":
        proc = subprocess.run([sys.executable, "-m", "mergebuild", *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = in_process(args, cwd, full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mergebuild {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def in_process(args: list[str], cwd: Path, env: dict, width: int = 200) -> subprocess.CompletedProcess:
    """mergebuild.cli.main(args) run in `cwd` with exactly `env`, its output captured."""
    import contextlib
    import io

    from mergebuild.render import console as report
    from mergebuild.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, here = dict(os.environ), os.getcwd()
    widths = (report.out.width, report.err.width)
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        report.out.width = report.err.width = width
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved_env)
        report.out.width, report.err.width = widths
    return subprocess.CompletedProcess(["mergebuild", *args], code, out.getvalue(), err.getvalue())


def build_json(*args, cwd: Path, env: dict | None = None) -> dict:
    proc = run_cli(*args, "--json", "-q", cwd=cwd, env=env, check=True)
    return json.loads(proc.stdout)


@pytest.fixture(autouse=True)
def _own_mergebuild_home(tmp_path_factory, monkeypatch):
    """Every test its own per-user state (MERGEBUILD_HOME: the fingerprint store): no test
    touches the real home, and none sees the files another one hashed."""
    monkeypatch.setenv("MERGEBUILD_HOME", str(tmp_path_factory.mktemp("mb-home")))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with three tiny models: base, and two fine-tunes of it (real, anime)."""
    base = small_model(0)
    write_model(tmp_path / "models" / "base.safetensors", base)
    for i, name in ((1, "real"), (2, "anime")):
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() and "model" in k else v
                 for k, v in base.items()}
        write_model(tmp_path / "models" / f"{name}.safetensors", tuned)
    return tmp_path


CHAIN = """
[models.base]
path = "models/base.safetensors"
[models.real]
path = "models/real.safetensors"
[models.anime]
path = "models/anime.safetensors"

[merges.mix1]
method = "weighted_sum"
inputs = ["real", "anime"]
alpha = {a1}

[merges.mix2]
method = "add_difference"
inputs = ["mix1", "anime", "base"]
alpha = {a2}

[merges.final]
method = "weighted_sum"
inputs = ["mix2", "real"]
alpha = {a3}
output = "out/final.safetensors"
"""


def chain(a1=0.4, a2=0.5, a3=0.25) -> str:
    return CHAIN.format(a1=a1, a2=a2, a3=a3)


def mergekit_digests(entry) -> list[str]:
    """tests/data/mergekit_0.1.5/outputs.json's digests of one tensor: one, or a list where
    mergekit wrote different bytes on different machines (karcher follows the CPU it ran on)."""
    return [entry] if isinstance(entry, str) else entry


def load(path: Path) -> dict:
    return load_file(str(path))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one module of --ray tests (Ray's start-up costs seconds): two CPUs,
    no dashboard; yields the address another process (a `tune --ray` subprocess) joins. Shut down
    after the module: its idle workers would otherwise take CPU from the rest of the suite."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()

"""The remote cache tier, on loopback only: an S3 endpoint (moto's server on 127.0.0.1, started
and stopped here) and a shared folder (file://). Two machines are two local caches sharing one
remote; every check drives the real CLI and compares bytes with a build that never saw a remote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import chain, mergefile, run_cli

pytest.importorskip("fsspec")
SECRET = "PLANTED-s3cr3t-7f3a9c"  # must never be shown, recorded or logged
KEY_ID = "AKIAPLANTEDKEYID0001"
TARGET = "out/final.safetensors"
FAST = "remote_options = { config_kwargs = { retries = { max_attempts = 1 } } }"  # a dead endpoint fails at once


@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield server, f"http://{host}:{port}"
    server.stop()


def s3_env(endpoint: str) -> dict:
    return {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key=KEY_ID, secret=SECRET, endpoint_url=endpoint, skip_instance_cache=True)


_buckets = iter(range(10**6))


@pytest.fixture(params=["file", "s3"])
def remote(request, tmp_path):
    """(url, env, fs, root): a fresh remote of each kind, fs/root to look inside it."""
    if request.param == "file":
        import fsspec

        folder = tmp_path / "shared"
        return f"file://{folder}", {}, fsspec.filesystem("file"), str(folder)
    _server, endpoint = request.getfixturevalue("s3_server")
    fs = s3fs_for(endpoint)
    bucket = f"mb-test-{next(_buckets)}"
    fs.mkdir(bucket)
    return f"s3://{bucket}/team/cache", s3_env(endpoint), fs, f"{bucket}/team/cache"


def with_remote(project: Path, url: str, extra: str = "") -> Path:
    text = chain()
    return mergefile(project / "mergefile.toml", f'[settings]\nremote_cache = "{url}"\n{extra}\n{text}')


def build(project: Path, cache: str, env: dict, *flags) -> tuple[int, dict, str]:
    proc = run_cli("--json", "-q", "--cache-dir", project / cache, *flags, cwd=project, env=env)
    doc = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return proc.returncode, doc, proc.stderr


def computed(doc: dict) -> int:
    return sum(m["computed"] for m in doc["merges"].values())


def output_sha(project: Path) -> str:
    return hashlib.sha256((project / TARGET).read_bytes()).hexdigest()


def reference_sha(project: Path) -> str:
    """The output of a build with no remote at all, in a cache of its own (call it first)."""
    mergefile(project / "mergefile.toml", chain())
    run_cli("-q", "--cache-dir", project / "ref-cache", cwd=project, check=True)
    sha = output_sha(project)
    (project / TARGET).unlink()
    return sha


def blobs(fs, root: str) -> list[str]:
    return [p for p in fs.find(f"{root}/v1/blobs")]


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_a_second_machine_computes_nothing_and_writes_the_same_bytes(project, remote):
    url, env, fs, root = remote
    expected = reference_sha(project)
    with_remote(project, url)
    code, first, err = build(project, "machine-a", env)
    assert code == 0, err
    assert computed(first) > 0 and output_sha(project) == expected
    assert first["tiers"]["remote"]["blobs_up"] > 0 and first["tiers"]["remote"]["entries_up"] > 0
    (project / TARGET).unlink()

    code, second, err = build(project, "machine-b", env)
    assert code == 0, err
    assert computed(second) == 0
    assert output_sha(project) == expected
    tiers = second["tiers"]["remote"]
    assert tiers["hits"] > 0 and tiers["misses"] == 0 and tiers["blobs_up"] == 0 and tiers["bad_blobs"] == 0
    # only the target's tensors came over (the intermediates it is made of were never needed)
    target_bytes = (project / TARGET).stat().st_size
    assert 0 < tiers["bytes_down"] < 2 * target_bytes
    # the output is the one copy of a target's tensors: no blob copies left in machine B's cache
    stats = json.loads(run_cli("cache", "stats", "--json", "--cache-dir", project / "machine-b",
                               cwd=project, env=env, check=True).stdout)
    assert stats["blobs"] == 0
    assert stats["tiers"]["remote"]["hits"] == tiers["hits"]
    assert stats["tiers"]["remote"]["url"] == url
    # and machine B's next no-op build asks the remote nothing
    code, third, err = build(project, "machine-b", env)
    assert code == 0 and computed(third) == 0 and third["tiers"]["remote"]["hits"] == 0, err
    assert third["tiers"]["remote"]["misses"] == 0


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_corrupted_or_deleted_remote_blob_is_recomputed_and_healed(project, remote, damage):
    url, env, fs, root = remote
    expected = reference_sha(project)
    with_remote(project, url)
    assert build(project, "machine-a", env)[0] == 0
    (project / TARGET).unlink()
    stored = blobs(fs, root)
    assert stored
    for path in stored:  # every blob, so the target and what it is made of are all bad
        if damage == "delete":
            fs.rm_file(path)
        else:
            data = bytearray(fs.cat_file(path))
            data[len(data) // 2] ^= 0xFF
            fs.pipe_file(path, bytes(data))

    code, doc, err = build(project, "machine-b", env)
    assert code == 0, err
    assert output_sha(project) == expected
    assert computed(doc) > 0
    if damage == "corrupt":
        assert doc["tiers"]["remote"]["bad_blobs"] > 0
    assert not warnings(err)  # lost or wrong bytes cost time, not a warning
    (project / TARGET).unlink()
    # the good bytes went back: a third machine computes nothing
    code, doc, err = build(project, "machine-c", env)
    assert code == 0 and computed(doc) == 0 and doc["tiers"]["remote"]["bad_blobs"] == 0, err
    assert output_sha(project) == expected


def test_the_remote_dying_mid_build_is_one_warning_and_a_correct_local_build(project, tmp_path, monkeypatch):
    """A moto server of its own, stopped when the second build first fetches a tensor."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    from mergebuild.store import remote as remote_mod

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3fs_for(endpoint).mkdir("dying")
    env = s3_env(endpoint)
    expected = reference_sha(project)
    with_remote(project, "s3://dying/cache", FAST)
    assert build(project, "machine-a", env)[0] == 0
    (project / TARGET).unlink()

    original = remote_mod.RemoteTier.get_many
    stopped = []

    def get_then_die(self, *args):
        if not stopped:
            server.stop()
            stopped.append(True)
        return original(self, *args)

    monkeypatch.setattr(remote_mod.RemoteTier, "get_many", get_then_die)
    code, doc, err = build(project, "machine-b", env)
    assert stopped and code == 0, err
    assert output_sha(project) == expected
    lines = warnings(err)
    assert len(lines) == 1 and "remote cache s3://dying/cache" in lines[0] and "local cache only" in lines[0], err
    assert doc["tiers"]["remote"]["errors"] == 1
    assert SECRET not in err

    # with require, the same remote (now gone) is a one-line error, exit 1
    (project / TARGET).unlink()
    code, _doc, err = build(project, "machine-c", env, "--remote-cache=require")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("mergebuild: error: remote cache"), err
    assert "require" in lines[0] and SECRET not in err
    assert not (project / TARGET).exists()
    # without it, unreachable from the start: one warning, a correct build
    code, doc, err = build(project, "machine-d", env)
    assert code == 0 and len(warnings(err)) == 1 and output_sha(project) == expected, err


def test_require_fails_when_the_remote_dies_mid_build(project, monkeypatch, tmp_path):
    from mergebuild.store import remote as remote_mod

    folder = tmp_path / "shared"
    with_remote(project, f"file://{folder}")
    assert build(project, "machine-a", {})[0] == 0
    (project / TARGET).unlink()

    original = remote_mod.RemoteTier._read_many

    def broken(self, paths, limits):
        if "/blobs/" in paths[0]:  # planning read the entries; the build's first tensor fails
            raise ConnectionError("the network went away")
        return original(self, paths, limits)

    monkeypatch.setattr(remote_mod.RemoteTier, "_read_many", broken)
    code, _doc, err = build(project, "machine-b", {}, "--remote-cache=require")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "went away" in lines[0] and "require" in lines[0], err
    assert not (project / TARGET).exists()


def test_read_mode_writes_nothing_and_off_ignores_the_remote(project, tmp_path):
    folder = tmp_path / "shared"
    with_remote(project, f"file://{folder}")
    code, doc, err = build(project, "machine-a", {}, "--remote-cache=read")
    assert code == 0 and doc["tiers"]["remote"]["blobs_up"] == 0, err
    assert not (folder / "v1" / "blobs").exists()
    (project / TARGET).unlink()
    code, doc, err = build(project, "machine-b", {}, "--remote-cache=off")
    assert code == 0 and not folder.exists() and "tiers" not in doc, err


def test_a_planted_secret_never_appears(project, s3_server, tmp_path):
    """Credentials in remote_options and in the environment: not in any output, error, warning,
    lineage, lock file, cache file or stats; a URL's user:password@ is shown as ***@."""
    server, endpoint = s3_server
    s3fs_for(endpoint).mkdir("secrets")
    env = s3_env(endpoint)
    options = (f'remote_options = {{ key = "{KEY_ID}", secret = "{SECRET}", endpoint_url = "{endpoint}", '
               'config_kwargs = { retries = { max_attempts = 1 } } }')
    with_remote(project, "s3://secrets/cache", options)
    shown = []
    for args in (["--json"], ["-v"], ["-n", "-v"], ["status", "--json"], ["cache", "stats"], ["cache", "stats", "--json"],
                 ["lineage", TARGET], ["report"]):
        proc = run_cli(*args, "--cache-dir", project / "c", cwd=project, env=env) if args[0] != "lineage" else \
            run_cli(*args, cwd=project, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        shown += [proc.stdout, proc.stderr]
    # an unreachable endpoint's warning and require's error
    dead = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    mergefile(project / "mergefile.toml", (project / "mergefile.toml").read_text().replace(endpoint, "http://127.0.0.1:9"))
    (project / TARGET).unlink()
    for flags in ([], ["--remote-cache=require"]):
        proc = run_cli("--cache-dir", project / "d", *flags, cwd=project, env=dead)
        shown += [proc.stdout, proc.stderr]
        assert "127.0.0.1:9" in proc.stderr
    # a URL carrying user:password@
    mergefile(project / "mergefile.toml", chain().replace("[models.base]", f'[settings]\nremote_cache = '
                                                          f'"ftp://user:{SECRET}@127.0.0.1:9/x"\n[models.base]', 1))
    proc = run_cli("-q", "--cache-dir", project / "e", cwd=project, env=dead)
    shown += [proc.stdout, proc.stderr]
    assert "***@" in proc.stderr, proc.stderr
    files = [p for p in project.rglob("*") if p.is_file() and not p.name.endswith(".toml")]
    blob = b"".join(p.read_bytes() for p in files if p.stat().st_size < 50_000_000)
    assert SECRET.encode() not in blob
    for text in shown:
        assert SECRET not in text and KEY_ID not in text


def test_a_missing_fsspec_is_one_line(project, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec raises ImportError
    with_remote(project, f"file://{tmp_path / 'shared'}")
    proc = run_cli("-q", "--cache-dir", project / "c", cwd=project)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "mergebuild[remote]" in lines[0], proc.stderr


def test_a_bad_remote_url_is_a_mergefile_error(project):
    with_remote(project, "not-a-url")
    proc = run_cli("-q", cwd=project)
    assert proc.returncode == 2 and "remote_cache" in proc.stderr and "s3://bucket/prefix" in proc.stderr


def test_the_environment_names_the_remote_and_wins_over_the_setting(project, tmp_path):
    mergefile(project / "mergefile.toml", chain())
    folder = tmp_path / "from-env"
    code, doc, err = build(project, "machine-a", {"MERGEBUILD_REMOTE_CACHE": f"file://{folder}"})
    assert code == 0 and doc["tiers"]["remote"]["blobs_up"] > 0 and (folder / "v1" / "FORMAT").is_file(), err
    with_remote(project, f"file://{tmp_path / 'from-setting'}")
    (project / TARGET).unlink()
    code, doc, err = build(project, "machine-b", {"MERGEBUILD_REMOTE_CACHE": f"file://{folder}"})
    assert code == 0 and computed(doc) == 0 and not (tmp_path / "from-setting").exists(), err


def test_a_whole_model_statistic_is_shared_through_the_remote(tmp_path, counted_matching):
    """The permutation a first machine computed (a statistic, not a tensor) is fetched by a
    second one, verified like any blob: the second computes no weight matching, same bytes."""
    from tests.e2e.test_rebasin_cli import MERGEFILE, mlp_pair

    mlp_pair(tmp_path)
    mergefile(tmp_path / "mergefile.toml",
              f'[settings]\nremote_cache = "file://{tmp_path / "shared"}"\n' + MERGEFILE.format(alpha=0.25, extra=""))
    rc, _, err = build(tmp_path, "c1", {})
    assert rc == 0, err
    first = hashlib.sha256((tmp_path / "out/mix.safetensors").read_bytes()).hexdigest()
    assert len(counted_matching) == 1
    for out in (tmp_path / "out").iterdir():
        out.unlink()
    rc, doc, err = build(tmp_path, "c2", {})
    assert rc == 0, err
    assert len(counted_matching) == 1  # the permutation came from the remote
    assert computed(doc) < sum(m["tensors"] for m in doc["merges"].values())
    assert hashlib.sha256((tmp_path / "out/mix.safetensors").read_bytes()).hexdigest() == first


@pytest.fixture
def counted_matching(monkeypatch):
    from mergebuild.methods import weight_matching as wm

    calls = []
    real = wm.weight_matching
    monkeypatch.setattr(wm, "weight_matching", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls

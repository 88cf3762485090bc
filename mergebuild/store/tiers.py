"""What each cache tier served and moved, and keeping secrets out of what is shown.

A build counts, per tier, the cache keys it found there (hits), the keys the remote did not
have (misses), and the bytes it moved; `cache stats` shows the totals over every build of the
cache (kept in <cache>/tiers.json, written by the build that holds the cache lock).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mergebuild.portable import replace

STATS_FILE = "tiers.json"
MODES = ("off", "read", "readwrite", "require")  # --remote-cache
ENV_URL = "MERGEBUILD_REMOTE_CACHE"  # the remote's URL, over [settings] remote_cache
# option names whose values are secrets (s3fs: key, secret, token; client_kwargs'
# aws_secret_access_key, aws_session_token; a password anywhere)
SECRET_NAME = re.compile(r"key|secret|token|passw|credential|session|auth", re.IGNORECASE)
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


@dataclass
class TierStats:
    local_hits: int = 0  # cache keys found with their bytes in the local cache
    local_bytes_read: int = 0  # bytes of tensors read back from local blobs and recorded files
    remote_hits: int = 0  # cache keys found in the remote's entries
    remote_misses: int = 0  # cache keys asked of the remote and not found
    blobs_down: int = 0  # tensors fetched from the remote and verified
    bytes_down: int = 0  # bytes read from the remote (entries and blobs)
    blobs_up: int = 0
    entries_up: int = 0
    bytes_up: int = 0  # bytes written to the remote
    bad_blobs: int = 0  # remote tensors whose bytes did not match their digest (not used)
    errors: int = 0  # times the remote failed and the build went on local-only

    def add(self, other: "TierStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def by_tier(self) -> dict:
        d = asdict(self)
        return {"local": {"hits": d["local_hits"], "bytes_read": d["local_bytes_read"]},
                "remote": {k.removeprefix("remote_"): v for k, v in d.items() if not k.startswith("local_")}}


def load_stats(root: Path) -> TierStats:
    try:
        doc = json.loads((Path(root) / STATS_FILE).read_text())
        names = {f.name for f in fields(TierStats)}
        return TierStats(**{k: int(v) for k, v in doc.items() if k in names})
    except (OSError, ValueError, TypeError):
        return TierStats()  # none yet, or unreadable: counting starts again


def save_stats(root: Path, build: TierStats) -> None:
    """Add a build's counts to the cache's totals (under the cache lock; temp then rename)."""
    if build == TierStats():  # nothing counted (a no-op build): the totals stay as they are
        return
    total = load_stats(root)
    total.add(build)
    path = Path(root) / STATS_FILE
    temp = path.with_name(f"{STATS_FILE}.{os.urandom(4).hex()}.tmp")
    try:
        temp.write_text(json.dumps(asdict(total)) + "\n")
        replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)  # only statistics: never fail a build for them


def redact(text: str, options: dict | None = None) -> str:
    """text with the secrets it may carry replaced by ***: a URL's user:password@, the values of
    secret-named options (at any depth) and the AWS secret environment variables."""
    text = USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
    for secret in sorted(set(_secrets(options or {})) | {os.environ.get(n, "") for n in SECRET_ENV}, key=len,
                         reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _secrets(options) -> list[str]:
    out = []
    items = options.items() if isinstance(options, dict) else enumerate(options) if isinstance(options, list) else ()
    for name, value in items:
        if isinstance(value, (dict, list)):
            out += _secrets(value)
        elif isinstance(value, str) and SECRET_NAME.search(str(name)):
            out.append(value)
    return out

"""The remote tier behind a local cache: attached when a command opens the cache, settled after
a build (uploads finished, fetched copies an output holds dropped, the counts kept), and what
`cache stats` says of it. The tier itself: remote.py; its reads behind the cache: remote_reads.py.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mergebuild.errors import UsageError
from mergebuild.store.tiers import ENV_URL, MODES, TierStats, load_stats, redact, save_stats

if TYPE_CHECKING:
    from mergebuild.store.remote import RemoteTier


def attach_remote(cache, url: str | None, options: dict | None, mode: str | None) -> RemoteTier | None:
    """Put the remote tier behind `cache`. url: [settings] remote_cache (MERGEBUILD_REMOTE_CACHE
    wins); mode: --remote-cache (None: readwrite when a remote is set). It connects on first use
    (under `require`: now, and unreachable is an error); a remote that fails stays attached,
    dead, its warning in .warnings."""
    url = os.environ.get(ENV_URL) or url
    mode = mode or ("readwrite" if url else "off")
    if mode not in MODES:
        raise UsageError(f"--remote-cache {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if not url:
        raise UsageError(f"--remote-cache={mode}: no remote cache is set ([settings] remote_cache or {ENV_URL})")
    check_url(url, ENV_URL if os.environ.get(ENV_URL) else "[settings] remote_cache")
    from mergebuild.store.remote import RemoteTier  # imported only where a remote is set
    from mergebuild.store.remote_reads import RemoteReads

    tier = RemoteTier(url, options, mode, cache.token)
    cache.remote, cache.remote_reads = tier, RemoteReads(cache, tier)
    if mode == "require":
        tier.probe()  # strict: reached before anything runs (the others connect on first use)
    return tier


def check_url(url: str, where: str) -> None:
    if "://" not in url or not url.split("://", 1)[1].strip("/"):
        raise UsageError(f"{where}: expected a URL such as s3://bucket/prefix or file:///shared/folder, "
                         f"got {redact(url)!r}")


def finish_build(cache) -> dict:
    """After a build's merges: wait for the uploads, drop the blob copies of fetched tensors an
    output now holds, add this build's counts to the cache's totals; this build's, by tier."""
    stats = TierStats()
    stats.add(cache.tier_stats)
    if cache.remote is not None:
        cache.remote.finish()
        stats.add(cache.remote.stats)
    if cache.remote_reads is not None:
        cache.remote_reads.drop_copies_in_outputs()
    if not cache.readonly:
        save_stats(cache.root, stats)
    return stats.by_tier()


def tier_totals(root, settings=None) -> dict:
    """What `cache stats` shows of the tiers: the totals over every build of this cache, and
    the remote this Mergefile names (redacted; it is not contacted)."""
    doc = load_stats(root).by_tier()
    url = os.environ.get(ENV_URL) or (settings.remote_cache if settings is not None else None)
    doc["remote"]["url"] = redact(url, settings.remote_options if settings is not None else None) if url else None
    return doc

"""mergebuild: merge neural-network checkpoints as a build, with a per-tensor cache.

The Python API (mergebuild.api, docs/api.md) is here too: mergebuild.load, plan, dry_run,
build, status, lineage. It is imported on first use, so `import mergebuild` stays light.
"""

__version__ = "0.1.0"

_API = ("load", "plan", "dry_run", "build", "status", "lineage", "BuildResult", "Mergefile")
# (the package that plans builds is mergebuild.planning, so mergebuild.plan is the API's function)


def __getattr__(name: str):
    if name in _API:
        from mergebuild import api

        return getattr(api, name)
    raise AttributeError(f"module 'mergebuild' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))

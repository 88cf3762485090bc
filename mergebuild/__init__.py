"""mergebuild: merge neural-network checkpoints as a build, with a per-tensor cache."""

__version__ = "0.1.0"

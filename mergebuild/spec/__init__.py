"""The Mergefile: its data model and its parser."""

from mergebuild.spec.model import Mergefile, MergeSpec, ModelSpec, Settings
from mergebuild.spec.mergefile import load_mergefile, parse_mergefile

__all__ = ["Mergefile", "MergeSpec", "ModelSpec", "Settings", "load_mergefile", "parse_mergefile"]

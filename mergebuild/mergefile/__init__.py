"""The Mergefile: its data model and its parser."""

from mergebuild.mergefile.model import Mergefile, MergeSpec, ModelSpec, Settings
from mergebuild.mergefile.parse import load_mergefile, parse_mergefile

__all__ = ["Mergefile", "MergeSpec", "ModelSpec", "Settings", "load_mergefile", "parse_mergefile"]

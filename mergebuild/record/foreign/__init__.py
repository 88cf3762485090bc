"""Other tools' recipes, and a model file's own, read into Mergefiles (`mergebuild import`) and
lineage (`mergebuild lineage`): mergekit YAML and mergekit-multi files (mergekit.py), sd-mecha's
.mecha recipes (mecha.py), and the recipe a file's metadata records (files.py), with its parents
found by hash (finder.py). Everything read here is untrusted: what is malformed is one line
(InputError, exit 2), never a traceback; what is well formed but has no Mergefile form is listed.
"""

from __future__ import annotations

from pathlib import Path

from mergebuild.errors import InputError
from mergebuild.mergefile.importing import Draft, check, render
from mergebuild.record.foreign.finder import ModelFinder

MAX_RECIPE = 10_000_000  # bytes of a recipe file, at most
MODEL_FILES = (".safetensors", ".sft")
OTHER_MODEL_FILES = (".ckpt", ".pt", ".pth", ".bin", ".gguf")


def import_recipe(path: Path, models: list[Path], mergefile: Path) -> tuple[str, Draft]:
    """The Mergefile text for the recipe at `path`, to be written as `mergefile` (its folder is
    where relative paths start), and the draft it was made from (what was left out, what is missing)."""
    from mergebuild.record.foreign.files import import_model_file
    from mergebuild.record.foreign.mecha import import_mecha
    from mergebuild.record.foreign.mergekit import import_mergekit

    path = Path(path)
    for folder in models:
        if not Path(folder).is_dir():
            raise InputError(f"--models {folder}: no such folder")
    finder = ModelFinder(models)
    draft = Draft(source=path.name, base=Path(mergefile).parent)
    kind = detect(path)
    if kind == "model":
        import_model_file(path, draft, finder)
    elif kind == "mecha":
        import_mecha(read_text(path), path, draft, finder)
    else:
        import_mergekit(read_text(path), path, draft, finder)
    text = render(draft)
    check(text, Path(mergefile), draft.recorded)
    return text, draft


def detect(path: Path) -> str:
    """"model" (a safetensors file or a model folder), "mecha" or "mergekit"."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        return "model"
    suffix = path.suffix.lower()
    if suffix in MODEL_FILES:
        return "model"
    if suffix in OTHER_MODEL_FILES:
        raise InputError(f"{path}: a {suffix} file carries no recipe (recipes are in safetensors metadata)")
    if suffix == ".mecha":
        return "mecha"
    if suffix in (".yml", ".yaml"):
        return "mergekit"
    try:
        with open(path, "rb") as f:
            start = f.read(16)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if start.lstrip(b"\xef\xbb\xbf").startswith(b"version"):
        return "mecha"
    if len(start) > 8 and start[8:9] == b"{":
        return "model"
    return "mergekit"


def read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE:
            raise InputError(f"{path}: {size:,} bytes: too large for a recipe")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (a recipe is text)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None

"""The parsed Mergefile as frozen values (no I/O, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FILE_SUFFIX = ".safetensors"  # an output with this suffix is one file; any other name is a model folder
# model files mergebuild does not write: an output named so is a mistake, not a folder
MODEL_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")

# Metadata keys an output never copies from its inputs ([settings] copy_metadata): the ones
# mergebuild writes itself, and other tools' lineage of the input, which would be stale in the
# output (A1111's own keys, sd-mecha's recipe, ComfyUI's workflow, kohya's hashes of that file).
OWN_METADATA = ("format", "sd_merge_recipe", "sd_merge_models", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.implementation", "modelspec.title", "modelspec.date",
                "modelspec.merged_from", "modelspec.hash_sha256")
STALE_METADATA = ("mecha_recipe", "prompt", "workflow", "sshs_model_hash", "sshs_legacy_hash")


def never_copied(key: str) -> str | None:
    """Why an input's metadata key is never copied into an output, or None if it may be."""
    if key.startswith("mergebuild."):
        return "is mergebuild's own lineage"
    if key in OWN_METADATA:
        return "is written by mergebuild itself"
    if key in STALE_METADATA:
        return "is the input's own lineage, stale in the output"
    return None


@dataclass(frozen=True)
class Settings:
    cache: Path
    device: str = "auto"
    compute_dtype: str = "float32"
    keep_builds: int = 3
    time_embed: str = "IN00"  # the MBW block of time_embed / label_emb: "IN00" (supermerger) or "BASE" (sd-mecha)
    staging: int = 256 * 10**6  # bytes of inputs loaded ahead of compute (device memory on a GPU)
    cache_limit: int | None = None  # bytes the cache may keep outside the outputs (None: the default)
    # the inputs' metadata an output copies (A1111's rule, later inputs winning): True all of it,
    # False none, or these keys; never what never_copied() names
    copy_metadata: bool | tuple[str, ...] = True
    # a shared cache behind the local one (store/remote.py): an fsspec URL, and the options its
    # file system takes (endpoint_url, profile...); neither reaches a key, a recipe or a lineage
    remote_cache: str | None = None
    remote_options: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class ScriptFunction:
    """`file.py:function` in a Mergefile: a function of a user's script."""

    path: Path  # absolute
    function: str
    text: str  # as written (the recipe records it)


@dataclass(frozen=True)
class FisherSpec:
    """A computed source: the diagonal empirical Fisher of model `of` (mergefile/computed.py)."""

    of: str  # the [models] table it is computed from
    loss: ScriptFunction  # loss(state_dict, batch) -> a scalar tensor
    batches: ScriptFunction  # batches() -> an iterable of batches, one sample each
    samples: int
    version: str | None = None  # declared by the user: stands for the scripts' content in the key


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path  # absolute; a computed source's: its loss script
    fisher: FisherSpec | None = None  # a computed source (no file of its own)


@dataclass(frozen=True)
class Rule:
    """An elemental override (supermerger's elemental merge): for the keys it selects, these
    parameter values replace the merge's. Later rules win."""

    params: dict = field(hash=False)
    blocks: str | None = None  # "IN04-IN08 M00"
    match: tuple[str, ...] = ()  # substrings of the key; any one selects it
    regex: str | None = None  # re.search on the key
    negate: bool = False  # `not = true`: select the keys that match/regex do NOT select


@dataclass(frozen=True)
class MergeSpec:
    name: str
    method: str
    inputs: tuple[str, ...]
    params: dict = field(hash=False)  # method parameters as written (plain values for now)
    output: Path | None = None  # absolute; a merge with an output is a target
    dtype: str | None = None  # an OUTPUT_DTYPES name (float16 ... float8_e5m2); None: the first input's, per tensor
    discard: str | None = None  # regex: keys to leave out of the result
    rules: tuple[Rule, ...] = ()
    include: tuple[str, ...] = ()  # regexes: only these keys are merged (others pass through from A)
    exclude: tuple[str, ...] = ()  # regexes: these keys pass through from A
    clip_to_inputs: bool = False  # clamp merged values to the inputs' range (sd-meh weights_clip)
    fix_clip_position_ids: bool = False  # reset CLIP position_ids to 0..76 (int64), as sd-meh does
    shard_size: int = 5_000_000_000  # folder outputs: bytes per safetensors shard at most
    vocab: str | None = None  # "base" | "union" | "truncate": the vocabulary rows (planning/vocab.py)
    tokenizer_source: str | None = None  # "base" | "union" | an input: the output's tokenizer (planning/vocab.py)
    # what a rule chose for a parameter written as a word (tail_average's k = "auto": the
    # two-tailed rule, tune/two_tailed.py); recorded in the lineage, outside the identity
    tail: dict | None = field(default=None, hash=False)


@dataclass(frozen=True)
class Mergefile:
    path: Path
    settings: Settings
    models: dict[str, ModelSpec]
    merges: dict[str, MergeSpec]
    tune: dict = field(default_factory=dict)  # the [tune] table, validated by mergebuild.tune
    soup: dict = field(default_factory=dict)  # the [soup] table (greedy soup)

    @property
    def targets(self) -> list[str]:
        return [name for name, m in self.merges.items() if m.output is not None]

    def node(self, name: str) -> ModelSpec | MergeSpec:
        return self.models.get(name) or self.merges[name]

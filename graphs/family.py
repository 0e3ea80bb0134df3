"""A model family: everything specific to one kind of checkpoint, named by one registered object.

`config.json`'s `model_type` picks the family (`family_of_config`); the manifest's config picks
it again when artifacts are opened. Everything else (the streaming export, the manifest, the
artifacts, backends, runner, sampling, the gate and its metrics, sensitivity, the TensorRT
stage, the CLI) reads what it needs through `Family.part` and imports no family's own module
(tests/test_family.py holds both rules).

A built-in family names each part "module" or "module:attribute" under `mllama_export`, imported
on first use, so that this module, like the contracts, imports neither torch nor anything above
graphs/; a family registered from outside (a plugin, the tests' stand-in) may give its parts as
the objects themselves. Each
part belongs to a folder (`PARTS`): a caller in engines/ may ask for graphs' and engines' parts,
never for exporter's, so the folder order of docs/architecture.md holds for parts as well.
Parts a family lacks (a text-only family has no image preprocessing; not every family
calibrates FP8) are refused by `part` in one line that names the family and the part.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mllama_export.errors import MllamaExportError

# part -> (the folder it lives in, what it is). The attribute's own docstring is its contract.
PARTS: dict[str, tuple[str, str]] = {
    # graphs/: the model as exported
    "config": ("graphs", "the frozen config class: from_hf_dict(raw), to_hf_dict()"),
    "presets": ("graphs", "preset name -> the config.json a checkpoint of it carries"),
    "contract": ("graphs", "GRAPHS, DYNAMIC_DIMS, static_dims(config), contract_markdown()"),
    "graph_modules": ("graphs", "graph name -> nn.Module class built from the family's model"),
    "model": ("graphs", "the nn.Module holding every weight, built from a config"),
    "checkpoint_format": (
        "graphs",
        "its checkpoints' layout: a graphs.checkpoint.CheckpointFormat (weight-name table, "
        "buffers a checkpoint lacks, side files of a synthetic one)",
    ),
    "checkpoint": ("graphs", "the strict checkpoint reader: Checkpoint(folder, config)"),
    "load_model": (
        "graphs",
        "load_model(folder, dtype=..., **model_options) -> the model, strictly",
    ),
    "synth": ("graphs", "write_checkpoint(config, out, seed, shards, dtype, max_shard_bytes)"),
    "truncated": (
        "graphs",
        "truncated(config, text_layers, vision_layers, global_layers, cross_layers) -> a "
        "shallower config (None: the family's default for that depth)",
    ),
    # engines/: running artifacts
    "inputs": ("engines", "the input processor: prompts, chat, token ids, images -> feeds"),
    "session": ("engines", "one generation over the family's graphs (prefill, then steps)"),
    "evalset": ("engines", "the built-in evaluation set and the reader of a user's"),
    "profiles": ("engines", "the TensorRT optimization-profile scheme of the graphs"),
    # exporter/: building artifacts
    "build": (
        "exporter",
        "the build's family hooks: traced dims and example inputs, model options, manifest "
        "fields, option checks (optional: exporter/family_build.py has the defaults)",
    ),
    "check": ("exporter", "what the build's check runs and what it costs in memory"),
    "fp8": ("exporter", "FP8: which linears, calibration, the quantized model for the check"),
    "plan": (
        "exporter",
        "the planner (`plan`): request(model, given, gpu, prompt_len, tiles, text_engine), "
        "plan_text(request) -> (text, fits)",
    ),
    "layerwise": (
        "exporter",
        "a checkpoint run layer by layer: LazyModel, LayerMajor, Job, read_float",
    ),
    # validate/: judging artifacts
    "reference": ("validate", "the independent transformers reference of the gate"),
    "synthetic_model": (
        "validate",
        "synthetic_model(config, seed, semantics): a preset's float32 model in memory",
    ),
}
FOLDERS = ("graphs", "engines", "exporter", "validate")


class FamilyConfig(Protocol):
    """What code outside a family reads of its frozen config; the rest is the family's."""

    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int
    vocab_size: int

    def to_hf_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Family:
    name: str  # "mllama": recorded nowhere new; the manifest's config.json says it again
    title: str  # for messages: "Llama 3.2 Vision (mllama)"
    model_types: tuple[str, ...]  # the config.json model_type values it reads
    parts: Mapping[str, Any]  # part -> "module[:attribute]" under mllama_export, or the part
    # its own modules, under mllama_export ("graphs.config"); nothing outside a family's
    # modules may import one of them (tests/test_family.py)
    modules: tuple[str, ...] = ()
    # what a checkpoint of it is, for "expected ..." messages
    example: str = ""
    # model types of other layouts of the same models, recognized only so that the family's
    # config reader refuses them with the way to convert (LLaVA: the original repository's)
    converted_from: tuple[str, ...] = ()
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise MllamaExportError(
                f"family {self.name}: unknown part(s) {unknown}; the parts are {list(PARTS)}"
            )

    def has(self, part: str) -> bool:
        return part in self.parts

    def part(self, part: str) -> Any:
        """The part, imported on first use; a part the family lacks is a one-line refusal."""
        if part not in PARTS:
            raise MllamaExportError(f"unknown family part {part!r}; the parts are {list(PARTS)}")
        if part not in self._loaded:
            if part not in self.parts:
                raise MllamaExportError(
                    f"the {self.title} family has no {part} ({PARTS[part][1]}); "
                    f"it has: {', '.join(self.parts)}"
                )
            target = self.parts[part]
            self._loaded[part] = _load(target) if isinstance(target, str) else target
        return self._loaded[part]

    # The parts every command needs, by name.
    @property
    def graphs(self) -> dict:
        """Graph name -> GraphSpec, in the order they run, are exported and listed."""
        return self.part("contract").GRAPHS

    @property
    def presets(self) -> Mapping[str, dict]:
        return self.part("presets") if self.has("presets") else {}

    def read_config(self, raw: dict) -> Any:
        """The family's frozen config, checked strictly (unknown and missing keys refused)."""
        return self.part("config").from_hf_dict(raw)


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    loaded = importlib.import_module(f"mllama_export.{module}")
    return getattr(loaded, attribute) if attribute else loaded


# The families this installation knows, registered by name. Each is declared in its own module
# (Mllama: graphs/mllama_family.py), imported here on first use of the registry.
_BUILTIN = {
    "mllama": "graphs.mllama_family:MLLAMA",
    "llava": "graphs.llava_family:LLAVA",
}
_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family (a test's stand-in, a plugin); its model types must be new."""
    taken = {t: f.name for f in families() for t in f.model_types}
    clash = [t for t in family.model_types if t in taken and taken[t] != family.name]
    if clash:
        raise MllamaExportError(
            f"family {family.name}: model_type(s) {clash} already belong to {taken[clash[0]]}"
        )
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[Family, ...]:
    for name, target in _BUILTIN.items():
        if name not in _FAMILIES:
            _FAMILIES[name] = _load(target)
    return tuple(_FAMILIES.values())


def family_named(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise MllamaExportError(
        f"unknown model family {name!r}; available: {', '.join(f.name for f in families())}"
    )


def model_types() -> str:
    """For messages: "'mllama' (a Llama 3.2 Vision checkpoint such as ...) or ..."."""
    return " or ".join(
        f"{' or '.join(map(repr, f.model_types))} ({f.example or f.title})" for f in families()
    )


def family_of_config(raw: Any, where: str = "config.json") -> Family:
    """The family whose model_type a config.json (as a dict) names."""
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    for family in families():
        if kind in family.model_types or kind in family.converted_from:
            return family
    if kind is None and isinstance(raw, dict) and "model_type" not in raw:
        # transformers writes model_type into every config.json it saves; one without it is
        # read as the first family's (earlier versions of this tool read only Mllama)
        return families()[0]
    raise MllamaExportError(f"{where} has model_type {kind!r}; expected {model_types()}")


def read_config(raw: Any, where: str = "config.json") -> Any:
    """config.json (as a dict) -> its family's frozen config."""
    return family_of_config(raw, where).read_config(raw)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a checkpoint folder's config.json (or of the file itself)."""
    path = Path(path)
    if not path.exists():
        raise MllamaExportError(
            f"{path} does not exist; expected a Hugging Face checkpoint folder with "
            "config.json (or the config.json itself)"
        )
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise MllamaExportError(f"no config.json at {file}; expected a Hugging Face checkpoint")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MllamaExportError(f"cannot read {file}: {err}; expected a JSON object") from err
    if not isinstance(raw, dict):
        raise MllamaExportError(f"{file} holds {type(raw).__name__}; expected a JSON object")
    return raw


def load_config(path: str | Path) -> Any:
    """A checkpoint folder's (or config.json's) frozen config, of the family it names."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    return read_config(read_config_json(path), str(file))


def family_of(config: Any) -> Family:
    """The family of a frozen config (its class is the family's `config` part)."""
    for family in families():
        if family.has("config") and isinstance(config, family.part("config")):
            return family
    raise MllamaExportError(
        f"{type(config).__name__} is no registered family's config; "
        f"the families: {', '.join(f.name for f in families())}"
    )


def all_presets() -> dict[str, Family]:
    """Preset name -> its family, over every family (names are unique across families)."""
    found: dict[str, Family] = {}
    for family in families():
        for name in family.presets:
            if name in found:
                raise MllamaExportError(
                    f"preset {name!r} is declared by both {found[name].name} and {family.name}"
                )
            found[name] = family
    return found

"""One answer to "which model?": a preset name, a checkpoint folder, or a Hugging Face Hub id.

``resolve_model("meta-llama/Llama-3.2-11B-Vision-Instruct")`` finds the checkpoint in
huggingface_hub's own cache (``HF_HUB_CACHE``, by default ~/.cache/huggingface/hub), and
downloads it there first where a network exists and ``HF_HUB_OFFLINE`` is not set. Only the
files a build reads are fetched: config, safetensors, tokenizer and processor files, never
pickled weights. ``build``, ``plan``, ``synth`` and the accuracy gate all resolve through here.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mllama_export.errors import MllamaExportError

from .family import Family, FamilyConfig, all_presets, family_of, load_config

# What a build reads from a checkpoint: the weights (safetensors only) and the side files.
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
]
# owner/name as the Hub spells repository ids (letters, digits, '-', '_', '.'; no '--' or '..')
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "preset", "folder" or "hub"
    name: str  # as the user gave it
    config: FamilyConfig  # its family's frozen config
    path: Path | None = None  # the checkpoint folder, absolute (None: a preset)
    hub_id: str | None = None
    revision: str | None = None  # the Hub commit the cached snapshot is

    @property
    def family(self) -> Family:
        return family_of(self.config)

    @property
    def preset(self) -> str | None:
        return self.name if self.kind == "preset" else None

    def describe(self) -> str:
        if self.kind == "preset":
            return f"the {self.name} preset (synthetic random weights)"
        if self.kind == "hub":
            return f"{self.hub_id} (Hugging Face cache {self.path})"
        return str(self.path)

    def to_json(self) -> dict:
        """The manifest's record of where the weights came from."""
        return {
            "source": self.name,
            "kind": self.kind,
            "checkpoint": None if self.path is None else str(self.path),
            **({"hub_id": self.hub_id, "revision": self.revision} if self.kind == "hub" else {}),
        }


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name


def resolve_model(
    name: str | os.PathLike, what: str = "--model", config_file: bool = False
) -> ResolvedModel:
    """A preset, an existing checkpoint folder (``config_file``: or its config.json), or a
    Hub id found in (or fetched into) the local cache; anything else is a one-line error."""
    text = os.fspath(name)
    path = Path(text)
    if path.exists():
        if path.is_file() and not (config_file and path.name.endswith(".json")):
            raise MllamaExportError(
                f"{what} {text!r} is a file; expected a checkpoint folder (config.json and "
                f"safetensors weights), a preset ({', '.join(all_presets())}) or a Hugging Face Hub id"
            )
        folder = path if path.is_dir() else path.parent
        config = load_config(path)
        return ResolvedModel("folder", text, config, folder.absolute())
    presets = all_presets()
    if text in presets:
        return ResolvedModel("preset", text, preset_config(text))
    if is_hub_id(text):
        return _from_hub(text, what)
    raise MllamaExportError(
        f"{what} {text!r} is neither a checkpoint folder, a preset ({', '.join(all_presets())}) nor "
        "a Hugging Face Hub id (owner/name)"
    )


def preset_config(name: str) -> FamilyConfig:
    """The frozen config of a preset of any family."""
    presets = all_presets()
    if name not in presets:
        raise MllamaExportError(f"unknown preset {name!r}; available: {', '.join(presets)}")
    family = presets[name]
    return family.read_config(copy.deepcopy(family.presets[name]))


def hub_cache() -> Path:
    """huggingface_hub's cache folder, read from the environment now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(repo_id: str, what: str) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .progress import step

    cache = hub_cache()
    try:
        folder = Path(
            snapshot_download(
                repo_id, cache_dir=cache, allow_patterns=HUB_FILES, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, OSError):
        if _offline():
            raise MllamaExportError(
                _not_cached(what, repo_id, cache, "HF_HUB_OFFLINE is set")
            ) from None
        try:
            with step(f"downloading {repo_id} from the Hugging Face Hub into {cache}"):
                folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=HUB_FILES))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
            reason = (
                str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            )
            raise MllamaExportError(_not_cached(what, repo_id, cache, reason)) from err
    if not (folder / "config.json").is_file():
        raise MllamaExportError(
            f"{what} {repo_id}: the cached snapshot {folder} has no config.json; expected a "
            f"complete download (huggingface-cli download {repo_id})"
        )
    config = load_config(folder)
    return ResolvedModel("hub", repo_id, config, folder, repo_id, folder.name)


def _not_cached(what: str, repo_id: str, cache: Path, reason: str) -> str:
    return (
        f"{what} {repo_id!r} is not a folder here, and as a Hugging Face Hub id it is not in "
        f"the cache {cache} ({reason}); download it there first (huggingface-cli download "
        f"{repo_id}), point HF_HUB_CACHE at the cache that holds it, or pass a checkpoint folder"
    )

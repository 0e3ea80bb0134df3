"""A user's ``prompts.jsonl``, read alike for any family's "evalset" part (Mllama's:
engines/evalset.py): one JSON object per line (blank lines and lines starting with # are
skipped), exactly one of ``prompt`` (text) and ``token_ids``, ``images`` (optional) files beside
it, ``name`` naming the case; case names unique. What a line's values become (tokenized, the
images preprocessed) is the family's: the ``start`` it passes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict

EVALSET_FILE = "prompts.jsonl"

Case = TypeVar("Case")
# where ("<file> line <n>"), the line's number, its checked values (prompt, token_ids, images,
# name; absent ones None or ()), its image files (all there) -> the family's case
MakeCase = Callable[[str, int, dict[str, Any], list[Path]], Case]


def read_prompts(
    folder: str | Path,
    start: Callable[[], MakeCase[Case]],
    as_object: Callable[[str, Any], dict[str, Any]] = strict.require_object,
) -> list[Case]:
    """The cases of ``folder/prompts.jsonl`` (or of the file ``folder``), one per line, made by
    what ``start()`` returns (called once the file is read); ``as_object(where, entry)`` refuses
    a line that is not a JSON object."""
    folder = Path(folder)
    file = folder / EVALSET_FILE if folder.is_dir() else folder
    if not file.is_file():
        raise MllamaExportError(
            f"no {EVALSET_FILE} in {folder}; expected a folder with {EVALSET_FILE} (one JSON "
            'object per line: {"prompt": "text"} or {"token_ids": [...]}, with optional '
            '"images": ["file.png", ...]) and the images beside it'
        )
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MllamaExportError(f"cannot read {file}: {err}") from err
    make = start()
    cases = [
        make(*_line(file, n, line, as_object))
        for n, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not cases:
        raise MllamaExportError(f"{file} holds no prompts; expected one JSON object per line")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MllamaExportError(f"{file}: case names must be unique; repeated: {dupes}")
    return cases


def _line(file: Path, n: int, line: str, as_object) -> tuple[str, int, dict, list[Path]]:
    where = f"{file} line {n}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise MllamaExportError(
            f"{where}: not valid JSON ({err.msg} at column {err.colno}); expected one JSON "
            'object per line, such as {"prompt": "Describe the image.", "images": ["cat.png"]}'
        ) from None
    values = strict.read(where, as_object(where, entry), _LINE_KEYS, prefix=f"{where}: ")
    # both checks refuse null, so a value is None exactly where its key is absent
    if (values["prompt"] is None) == (values["token_ids"] is None):
        raise MllamaExportError(f'{where}: expected exactly one of "prompt" (text) and "token_ids"')
    paths = [file.parent / i for i in values["images"]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MllamaExportError(
            f"{where}: image file(s) not found: {missing}; expected image files beside "
            f"{file.name} (or absolute paths)"
        )
    return where, n, values, paths


def _file_names(images: object) -> list[str]:
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise strict.Wrong("a list of file names")
    return images


def _token_ids(ids: object) -> list[int]:
    """The JSON's shape; the ids' range is the input processor's check."""
    if not isinstance(ids, list) or not ids:
        raise strict.Wrong("a non-empty list of integers")
    whole = strict.integer(floats=False)
    try:
        return [whole(t) for t in ids]
    except strict.Wrong:
        raise strict.Wrong("a non-empty list of integers") from None


def _text(prompt: object) -> str:
    if not isinstance(prompt, str) or not prompt:
        raise strict.Wrong("a non-empty string")
    return prompt


_LINE_KEYS = (
    strict.Key("prompt", _text, default=None),
    strict.Key("token_ids", _token_ids, default=None),
    strict.Key("images", _file_names, default=()),
    strict.Key("name", strict.string, default=None),
)

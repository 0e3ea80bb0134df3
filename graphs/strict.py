"""One strict reader for the JSON objects we accept from users: a declared table of keys per object.

Each object (a config.json section, preprocessor_config.json, a thresholds stage, a manifest, an
evaluation-set line) declares its keys once as `Key`s: required or optional with a default, and a
check that turns the JSON value into the Python one or says what was expected. `read` refuses
unknown keys, missing keys and wrong values, always in the same words:

    <where> has unknown key(s) ['x']; expected only [...]
    <where> is missing required key(s) ['x']; keys present: a, b
    <where>.<key> is <value>; expected <what>

A table whose keys name the fields of a frozen dataclass (`Key.attr`) also runs the other way:
`write` gives back the JSON object, so that a config's key <-> field mapping is spelled once.
Torch- and numpy-free: the CLI imports graphs cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mllama_export.errors import MllamaExportError

__all__ = [
    "REQUIRED",
    "Key",
    "Wrong",
    "anything",
    "boolean",
    "fields",
    "integer",
    "integers",
    "jsonable",
    "missing",
    "nullable",
    "number",
    "obj",
    "one_of",
    "read",
    "require_object",
    "string",
    "text",
    "wrong",
    "write",
]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class Wrong(Exception):
    """Raised by a check: its argument says what was expected (`read` adds where and what)."""


Check = Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """One key of a JSON object.

    `check` maps the JSON value to the Python one or raises `Wrong(expected)`. An absent optional
    key takes `default` unchecked. `attr` names the dataclass field the value fills (`write`
    reads it back); `dump` turns that field into JSON when `jsonable` does not, and `written`
    False keeps a key that is only read (an alternative spelling) out of `write`.
    """

    name: str
    check: Check
    default: Any = REQUIRED
    attr: str | None = None
    dump: Callable[[Any], Any] | None = None
    written: bool = True
    about: str = ""  # what the key holds, for the message when it is missing

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def wrong(label: str, value: Any, expected: str) -> MllamaExportError:
    """The one message for a value that is not what a key needs."""
    return MllamaExportError(f"{label} is {_show(value)}; expected {expected}")


def missing(
    where: str, raw: dict[str, Any], names: list[str], about: dict[str, str] | None = None
) -> MllamaExportError:
    """The one message for required keys an object lacks."""
    described = [f"{n}: {about[n]}" for n in names if about and about.get(n)]
    said = f" ({'; '.join(described)})" if described else ""
    present = ", ".join(sorted(raw)) or "none"
    return MllamaExportError(
        f"{where} is missing required key(s) {names}{said}; keys present: {present}"
    )


def require_object(where: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise MllamaExportError(
            f"{where} holds a JSON {type(raw).__name__}; expected a JSON object"
        )
    return raw


def read(
    where: str,
    raw: Any,
    keys: Sequence[Key],
    *,
    ignore: Iterable[str] = (),
    others: bool = False,
    note: str = "",
    prefix: str | None = None,
) -> dict[str, Any]:
    """key name -> checked value (defaults filled in) for the JSON object `raw`.

    `ignore` names keys accepted and dropped; `others` True accepts any key not declared (a
    reader that checks only what it reads); `note` is added to the unknown-key message.
    Values are labelled `prefix + key`, `where.` by default.
    """
    raw = require_object(where, raw)
    if not others:
        _refuse_unknown(where, raw, [k.name for k in keys], ignore, note)
    absent = [k.name for k in keys if k.required and k.name not in raw]
    if absent:
        raise missing(where, raw, absent, {k.name: k.about for k in keys})
    label = f"{where}." if prefix is None else prefix
    values = {}
    for key in keys:
        if key.name not in raw:
            values[key.name] = key.default
            continue
        try:
            values[key.name] = key.check(raw[key.name])
        except Wrong as err:
            raise wrong(label + key.name, raw[key.name], str(err)) from None
    return values


def _refuse_unknown(
    where: str, raw: dict[str, Any], names: list[str], ignore: Iterable[str], note: str
) -> None:
    skip = set(names) | set(ignore)
    unknown = sorted(k for k in raw if k not in skip)
    if unknown:
        raise MllamaExportError(
            f"{where} has unknown key(s) {unknown}; expected only {names}{note}"
        )


def fields(keys: Sequence[Key], values: dict[str, Any]) -> dict[str, Any]:
    """The dataclass keyword arguments among `read`'s values."""
    return {k.attr: values[k.name] for k in keys if k.attr}


def write(keys: Sequence[Key], source: Any) -> dict[str, Any]:
    """The JSON object for `source` (a dataclass the table's `attr`s name), in table order;
    keys without an `attr` are written as their default."""
    out = {}
    for key in keys:
        if not key.written:
            continue
        if key.attr is None:
            out[key.name] = key.default
        else:
            value = getattr(source, key.attr)
            out[key.name] = key.dump(value) if key.dump else jsonable(value)
    return out


def jsonable(value: Any) -> Any:
    """Tuples (of tuples) as JSON lists."""
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    return value


# -- checks ---------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(minimum: int | None = None, floats: bool = True) -> Check:
    """An integer; a boolean is not one, a float with no fraction (64.0) is unless `floats` is
    False."""
    expected = {None: "an integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )

    def check(value: Any) -> int:
        if not _is_number(value) or not float(value).is_integer():
            raise Wrong(expected)
        if not floats and not isinstance(value, int):
            raise Wrong(expected)
        if minimum is not None and value < minimum:
            raise Wrong(expected)
        return int(value)

    return check


def number(
    positive: bool = False,
    finite: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Check:
    """A number (integers too, booleans not), as a float."""
    if positive:
        expected = "a positive number"
    elif minimum is not None and maximum is not None:
        expected = f"a number in [{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        expected = f"a finite number >= {minimum:g}" if finite else f"a number >= {minimum:g}"
    else:
        expected = "a finite number" if finite else "a number"

    def check(value: Any) -> float:
        if not _is_number(value):
            raise Wrong(expected)
        value = float(value)
        bad = (positive and not value > 0) or (finite and not math.isfinite(value))
        bad = bad or (minimum is not None and not value >= minimum)
        if bad or (maximum is not None and not value <= maximum):
            raise Wrong(expected)
        return value

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Wrong("true or false")
    return value


def text(value: Any) -> str:
    """Any string."""
    if not isinstance(value, str):
        raise Wrong("a string")
    return value


def string(value: Any) -> str:
    """A non-empty string (not only blanks)."""
    if not isinstance(value, str) or not value.strip():
        raise Wrong("a non-empty string")
    return value


def anything(value: Any) -> Any:
    return value


def obj(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Wrong("a JSON object")
    return value


def one_of(*allowed: Any, why: str = "") -> Check:
    """One of the given values (compared with ==, as JSON numbers compare: 0 == 0.0)."""
    expected = (
        repr(allowed[0]) if len(allowed) == 1 else f"one of {', '.join(map(repr, allowed))}"
    ) + why

    def check(value: Any) -> Any:
        if not any(value == a for a in allowed):
            raise Wrong(expected)
        return value

    return check


def integers(value: Any) -> tuple[int, ...]:
    """A list of integers (as `integer` has them), as a tuple."""
    item = integer()
    if not isinstance(value, list):
        raise Wrong("a list of integers")
    try:
        return tuple(item(v) for v in value)
    except Wrong:
        raise Wrong("a list of integers") from None


def nullable(check: Check) -> Check:
    def nullable_check(value: Any) -> Any:
        return None if value is None else check(value)

    return nullable_check

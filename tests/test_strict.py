"""graphs/strict: the one reader every JSON input goes through (config.json, preprocessor
config, thresholds, manifest, evaluation-set lines); its messages, and its way back to JSON."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict
from mllama_export.graphs.strict import Key


@dataclass(frozen=True)
class Box:
    width: int
    ratios: tuple[tuple[int, int], ...]
    eps: float


KEYS = (
    Key("kind", strict.one_of("box"), default="box"),
    Key("w", strict.integer(minimum=1), attr="width", about="pixels across"),
    Key("ratios", strict.anything, attr="ratios"),
    Key("eps", strict.number(), attr="eps"),
    Key("old_spelling", strict.anything, default=None, written=False),
)
GOOD = {"kind": "box", "w": 4, "ratios": [[1, 2]], "eps": 1}


def test_reads_defaults_and_fields():
    values = strict.read("box.json", {"w": 4.0, "ratios": [], "eps": 1}, KEYS)
    assert values == {"kind": "box", "w": 4, "ratios": [], "eps": 1.0, "old_spelling": None}
    assert strict.fields(KEYS, values) == {"width": 4, "ratios": [], "eps": 1.0}


def test_writes_the_same_table_back():
    box = Box(width=4, ratios=((1, 2),), eps=1.0)
    written = strict.write(KEYS, box)
    assert written == {"kind": "box", "w": 4, "ratios": [[1, 2]], "eps": 1.0}
    assert list(written) == ["kind", "w", "ratios", "eps"]  # table order, read-only keys left out
    values = strict.read("box.json", written, KEYS)
    assert strict.fields(KEYS, values)["width"] == box.width


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1], r"^box.json holds a JSON list; expected a JSON object$"),
        (
            {**GOOD, "x": 1, "a": 2},
            r"^box.json has unknown key\(s\) \['a', 'x'\]; expected only \['kind', 'w', "
            r"'ratios', 'eps', 'old_spelling'\] \(and notes\)$",
        ),
        (
            {"kind": "box", "eps": 1},
            r"^box.json is missing required key\(s\) \['w', 'ratios'\] \(w: pixels across\); "
            r"keys present: eps, kind$",
        ),
        ({**GOOD, "w": "4"}, r"^box.json.w is '4'; expected a positive integer$"),
        ({**GOOD, "w": True}, r"^box.json.w is True; expected a positive integer$"),
        ({**GOOD, "w": 2.5}, r"^box.json.w is 2.5; expected a positive integer$"),
        ({**GOOD, "kind": "ball"}, r"^box.json.kind is 'ball'; expected 'box'$"),
        ({**GOOD, "eps": "x" * 200}, r"^box.json.eps is 'x{76}\.\.\.; expected a number$"),
    ],
)
def test_refusals_say_what_was_expected_and_what_is_there(raw, message):
    with pytest.raises(MllamaExportError, match=message):
        strict.read("box.json", raw, KEYS, note=" (and notes)")


def test_ignored_and_other_keys():
    assert strict.read("b", {**GOOD, "torchscript": 1}, KEYS, ignore={"torchscript"})["w"] == 4
    assert strict.read("b", {**GOOD, "anything": 1}, KEYS, others=True)["w"] == 4


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (strict.integer(), [3, 3.0, -1], ["3", True, 3.5, None]),
        (strict.integer(floats=False), [3], [3.0, False]),
        (strict.number(positive=True), [1e-9, 2], [0, -1, float("nan"), True]),
        (strict.number(finite=True, minimum=0), [0, 1e9], [-0.1, float("inf"), float("nan")]),
        (strict.number(minimum=0, maximum=1), [0, 1, 0.5], [1.5, -1, float("nan")]),
        (strict.integers, [[], [1, 2.0]], [[1, "2"], "1", None]),
        (strict.string, ["a"], ["", "  ", 1]),
        (strict.text, ["", "a"], [None, 1]),
        (strict.boolean, [True, False], [0, "true"]),
        (strict.nullable(strict.integer()), [None, 1], ["1"]),
    ],
)
def test_checks(check, good, bad):
    for value in good:
        check(value)
    for value in bad:
        with pytest.raises(strict.Wrong):
            check(value)


def test_config_reading_loads_neither_torch_nor_numpy():
    code = (
        "import sys; from mllama_export.graphs.config import preset; preset('tiny'); "
        "print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

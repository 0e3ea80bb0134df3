"""The family registry (graphs/family.py): model_type picks the family, parts load lazily and
only from their own folder, and no module outside a family's own imports one of its modules."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from test_imports import ROOT, _graph

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import family as registry
from mllama_export.graphs.family import PARTS, Family, families, family_of_config
from mllama_export.graphs.resolve import resolve_model


def _own_modules() -> dict[str, str]:
    return {m: f.name for f in families() for m in f.modules}


def test_no_module_outside_a_family_imports_a_family_module():
    own = _own_modules()
    leaks = [
        f"{e.where}: {e.source} imports {e.target} ({own[e.target]}'s own)"
        for e in _graph()
        if e.target in own and own.get(e.source) != own[e.target]
    ]
    assert not leaks, "\n".join(leaks)


def test_each_part_lives_in_its_folder_and_loads():
    for family in families():
        for part, target in family.parts.items():
            if not isinstance(target, str):
                continue  # a part given as the object itself (a family registered from outside)
            folder = PARTS[part][0]
            assert target.split(".")[0] == folder, f"{family.name} {part}: {target}"
            assert family.part(part) is not None
        for module in family.modules:
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def _part_requests() -> list[tuple[str, str, str]]:
    """(file:line, the caller's folder, the part asked for) for every literal .part("x")."""
    found = []
    for folder in registry.FOLDERS:
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("part", "has")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.append((where, folder, node.args[0].value))
    return found


def test_a_folder_asks_only_for_parts_of_its_own_folder_or_below():
    order = registry.FOLDERS
    wrong = [
        f"{where}: {folder} asks for {part!r}, a part of {PARTS[part][0]}"
        for where, folder, part in _part_requests()
        if part in PARTS and order.index(PARTS[part][0]) > order.index(folder)
    ]
    unknown = [f"{where}: {part!r}" for where, _, part in _part_requests() if part not in PARTS]
    assert not wrong and not unknown, "\n".join(wrong + unknown)


def test_model_type_picks_the_family_and_an_unknown_one_is_named():
    assert family_of_config({"model_type": "mllama"}).name == "mllama"
    with pytest.raises(MllamaExportError) as err:
        family_of_config({"model_type": "gpt2"}, "ckpt/config.json")
    assert str(err.value) == (
        "ckpt/config.json has model_type 'gpt2'; expected 'mllama' (a Llama 3.2 Vision "
        "checkpoint such as meta-llama/Llama-3.2-11B-Vision) or 'llava' or 'llava_next' (a LLaVA "
        "checkpoint such as llava-hf/llava-1.5-7b-hf)"
    )


def test_a_checkpoint_folder_of_an_unknown_family_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(MllamaExportError) as err:
        resolve_model(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path / 'config.json'} has model_type 'bert'; expected 'mllama' (a Llama 3.2"
    )


def test_a_part_the_family_lacks_is_a_one_line_refusal():
    bare = Family("bare", "a bare test family", ("bare",), {"config": "graphs.config:MllamaConfig"})
    with pytest.raises(MllamaExportError) as err:
        bare.part("fp8")
    assert str(err.value).startswith("the a bare test family family has no fp8 (FP8:")
    with pytest.raises(MllamaExportError, match="unknown part"):
        Family("odd", "odd", ("odd",), {"weights": "graphs.weights"})


def test_a_model_type_cannot_belong_to_two_families():
    with pytest.raises(MllamaExportError, match=r"\['mllama'\] already belong to mllama"):
        registry.register(Family("copy", "a copy", ("mllama",), {}))


def test_the_registry_and_resolving_a_preset_import_no_torch():
    code = (
        "import sys; from mllama_export.graphs.resolve import resolve_model; "
        "r = resolve_model('tiny'); assert r.family.name == 'mllama'; "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""Every mistake a user can make gets one clear error, and nothing is left half-written.

One table: each row sets one bad input up in tmp_path, then runs one CLI command or one Python
API call on it. Every row checks that the error names what was wrong and what was expected (or
what exists), and that no file or folder under tmp_path, under the artifact copies or under the
session fixtures was created, changed or removed. CLI rows also check exit status 2, that no
traceback is printed and that the refusal is one line, the output's last. Mllama's rows are
here; LLaVA's (its checkpoints, options, prompts and images) are in bad_inputs_llava.py.
Building is stubbed out after the checks (`StreamingExport` raises), so a bad input that a
build fails to refuse shows up at once instead of after a 36 s export.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_input_table import Row, api, cli
from bad_inputs_llava import ROWS as LLAVA_ROWS
from bad_inputs_llava import LlavaWorld, llava_world
from click.testing import CliRunner
from imagefiles import bomb_png, png_bytes
from safetensors.torch import load_file, save_file

from mllama_export.cli import main
from mllama_export.engines.evalset import EvalCase
from mllama_export.engines.preprocess import ImageProcessorConfig, preprocess
from mllama_export.engines.runner import Runner
from mllama_export.engines.sampling import Sampling
from mllama_export.engines.text import Tokenizer
from mllama_export.errors import MllamaExportError
from mllama_export.exporter.build import build
from mllama_export.exporter.manifest import write_manifest
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import MllamaConfig
from mllama_export.graphs.weights import load_model
from mllama_export.validate.gate import run_gate

IMG = "<|image|>"


def _cuda_runs() -> bool:
    from mllama_export.engines.onnxrt import cuda_runs

    return cuda_runs()


NO_CUDA = pytest.mark.skipif(_cuda_runs(), reason="CUDA runs here: --device cuda is no mistake")
ROOT_SKIP = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: permission bits do not stop root from reading the folder",
)


class LeftoverLock(AssertionError):
    """The only change a refused build left is its `.<out>.lock` file."""


# exporter/build.py takes its lock (creating `.<out>.lock` beside --out) before it checks the
# options and the checkpoint, and never removes the file. Rows refused after the lock is taken
# are expected to fail with LeftoverLock, and only with it: a wrong message or any other file
# left behind still fails them. Set this to False once build.py removes its lock file.
BUILD_LEAVES_LOCK = False
AFTER_LOCK = pytest.mark.xfail(
    BUILD_LEAVES_LOCK,
    raises=LeftoverLock,
    strict=True,
    reason="build.py leaves .<out>.lock behind when it refuses a build",
)


# -- the world each row runs in ----------------------------------------------------------------


@dataclass
class World:
    artifacts: Path  # the session's built tiny artifacts (hf mask, max_batch 4, 512 tokens)
    tiny_dir: Path  # the session's single-file synthetic checkpoint
    hf_checkpoint: Path  # the session's sharded checkpoint written by transformers
    shared: Path  # a module-wide copy of the artifacts, for rows that only read them
    runner: Any  # loaded from `shared`
    llava: LlavaWorld  # the second family's checkpoints and artifacts (bad_inputs_llava.py)

    @property
    def folders(self) -> list[Path]:
        return [self.artifacts, self.tiny_dir, self.hf_checkpoint, self.shared, *self.llava.folders]


@pytest.fixture(scope="module")
def world(tmp_path_factory, ort_artifacts, tiny_dir, hf_checkpoint) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    shared = Path(shutil.copytree(ort_artifacts, root / "art"))
    llava = llava_world(root / "llava")
    return World(
        ort_artifacts, tiny_dir, hf_checkpoint, shared, Runner.from_artifacts(shared), llava
    )


@dataclass
class Ctx:
    """What a row's setup may use: tmp_path, fixtures, and helpers that copy before changing."""

    tmp: Path
    world: World
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def shared(self) -> Path:
        return self.world.shared

    @property
    def runner(self):
        return self.world.runner

    def art(self) -> Path:
        return Path(shutil.copytree(self.world.artifacts, self.tmp / "art"))

    def manifest(self, change: Callable[[dict], Any]) -> Path:
        """An artifact copy whose manifest.json was edited by hand (files keep their hashes)."""
        folder = self.art()
        m = json.loads((folder / "manifest.json").read_text())
        change(m)
        (folder / "manifest.json").write_text(json.dumps(m))
        return folder

    def rebuilt_manifest(self, folder: Path) -> Path:
        """A fresh manifest for deliberately changed files: what a build would have written."""
        m = json.loads((folder / "manifest.json").read_text())
        del m["format"], m["files"]
        write_manifest(folder, m)
        return folder

    def onnx(self, graph: str, change: Callable[[Any], None]) -> Path:
        import onnx

        folder = self.art()
        path = folder / "onnx" / f"{graph}.onnx"
        model = onnx.load(str(path), load_external_data=False)
        change(model)
        onnx.save(model, str(path))
        return self.rebuilt_manifest(folder)

    def ckpt(self, sharded: bool = False) -> Path:
        src = self.world.hf_checkpoint if sharded else self.world.tiny_dir
        return Path(shutil.copytree(src, self.tmp / "ckpt"))

    def config(self, change: Callable[[dict], Any]) -> Path:
        folder = self.ckpt()
        raw = json.loads((folder / "config.json").read_text())
        change(raw)
        (folder / "config.json").write_text(json.dumps(raw))
        return folder

    def tensors(self, change: Callable[[dict], Any]) -> Path:
        folder = self.ckpt()
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    def file(self, name: str, data: bytes | str = b"") -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def png(self, name: str = "ok.png", size: tuple[int, int] = (40, 30)) -> Path:
        return self.file(name, png_bytes(*size))

    def thresholds(self, change: Callable[[dict], Any]) -> Path:
        from importlib import resources

        text = resources.files("mllama_export.validate").joinpath("thresholds.json").read_text()
        data = json.loads(text)
        change(data)
        return self.file("thresholds.json", json.dumps(data))

    def evalset(self, *lines: str) -> Path:
        self.file("evalset/prompts.jsonl", "\n".join(lines) + "\n")
        return self.tmp / "evalset"

    def build_args(self, *extra) -> list:
        return ["build", "--model", self.ckpt(), "--out", self.tmp / "o", *extra]

    def chdir(self, folder: Path) -> Path:
        here = Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        os.chdir(folder)
        self.cleanups.append(lambda: os.chdir(here))
        return folder

    def env(self, **values: str) -> None:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        self.cleanups.append(
            lambda: [os.environ.pop(k, None) if v is None else os.environ.update({k: v})
                     for k, v in saved.items()]
        )  # fmt: skip

    def patch(self, target: object, name: str, value: object) -> None:
        saved = getattr(target, name)
        setattr(target, name, value)
        self.cleanups.append(lambda: setattr(target, name, saved))

    def fp8_manifest(self) -> Path:
        """An artifact copy whose manifest says fp8 with text layers only (no --fp8-vision)."""

        def change(m):
            m["precision"] = "fp8"
            layer = {"input_amax": 1.0, "input_scale": 1.0, "weight_scale_range": [1.0, 1.0]}
            m["quantization"] = {"layers": {"text.layers.0.self_attn.q_proj": layer}}

        return self.manifest(change)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _set_location(model, value: str) -> None:
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = value


def _set_opset(version: int):
    def change(model):
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = version

    return change


def _set_ir(version: int):
    def change(model):
        model.ir_version = version

    return change


def _installed_major() -> int:
    return int(importlib.metadata.version("mllama-export").split(".")[0])


# -- setups that need more than a line -----------------------------------------------------------


def _unreadable(ctx: Ctx) -> list:
    folder = ctx.art()
    folder.chmod(0)
    ctx.cleanups.append(lambda: folder.chmod(stat.S_IRWXU))
    return ["run", folder, "--token-ids", "500,1"]


def _missing_shard(ctx: Ctx) -> list:
    folder = ctx.ckpt(sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    return ["build", "--model", folder, "--out", ctx.tmp / "o"]


def _truncated_shard(ctx: Ctx) -> list:
    folder = ctx.ckpt(sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return ["build", "--model", folder, "--out", ctx.tmp / "o"]


def _corrupt_header(ctx: Ctx) -> list:
    folder = ctx.ckpt()
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:20] = b"not a header"  # the JSON header starts after its 8-byte length
    (folder / "model.safetensors").write_bytes(bytes(data))
    return ["build", "--model", folder, "--out", ctx.tmp / "o"]


def _index_names_missing_shard(ctx: Ctx) -> list:
    folder = ctx.ckpt(sharded=True)
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = "model-00099-of-00099.safetensors"
    path.write_text(json.dumps(index))
    return ["build", "--model", folder, "--out", ctx.tmp / "o"]


def _index_not_json(ctx: Ctx) -> list:
    folder = ctx.ckpt(sharded=True)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    return ["build", "--model", folder, "--out", ctx.tmp / "o"]


def _pickled(ctx: Ctx) -> list:
    folder = ctx.tmp / "pickled"
    folder.mkdir()
    shutil.copy(ctx.world.tiny_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"never opened")
    return ["build", "--model", folder, "--out", ctx.tmp / "o"]


def _config_only(ctx: Ctx) -> Callable:
    folder = ctx.tmp / "config-only"
    folder.mkdir()
    shutil.copy(ctx.world.tiny_dir / "config.json", folder)
    return lambda: load_model(folder)


def _tensors_build(change) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ["build", "--model", ctx.tensors(change), "--out", ctx.tmp / "o"]

    return setup


def _plan_config(change) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ["plan", "--model", ctx.config(change)]

    return setup


def _run_on_manifest(change) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ["run", ctx.manifest(change), "--token-ids", "500,1"]

    return setup


def _run_on_onnx(graph: str, change) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ["run", ctx.onnx(graph, change), "--token-ids", "500,1"]

    return setup


def _run_image(name: str, data: bytes | None) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        path = ctx.tmp / name if data is None else ctx.file(name, data)
        return ["run", ctx.shared, "--prompt", "What is it?", "--image", path]

    return setup


def _delete(relative: str) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        folder = ctx.art()
        (folder / relative).unlink()
        return ["run", folder, "--token-ids", "500,1"]

    return setup


def _tampered(ctx: Ctx) -> list:
    folder = ctx.art()
    _flip_byte(folder / "onnx" / "vision.onnx")
    return ["run", folder, "--token-ids", "500,1"]


def _incomplete(ctx: Ctx) -> list:
    folder = ctx.art()
    (folder / "BUILD-INCOMPLETE").write_text("mllama-export build in progress\n")
    return ["run", folder, "--token-ids", "500,1"]


def _manifest_text(text: str) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        folder = ctx.art()
        (folder / "manifest.json").write_text(text)
        return ["run", folder, "--token-ids", "500,1"]

    return setup


def _force_over_user_files(ctx: Ctx) -> list:
    folder = ctx.file("thesis/thesis.txt", "three years of work\n").parent
    return ["build", "--model", ctx.ckpt(), "--out", folder, "--force"]


def _force_over_a_file(ctx: Ctx) -> list:
    return ["build", "--model", ctx.ckpt(), "--out", ctx.file("notes.txt", "mine"), "--force"]


def _out_is_the_current_folder(ctx: Ctx) -> list:
    ckpt = ctx.ckpt()
    ctx.chdir(ctx.tmp / "work")
    return ["build", "--model", ckpt, "--out", ".", "--force"]


def _out_holds_the_current_folder(ctx: Ctx) -> list:
    ckpt = ctx.ckpt()
    ctx.chdir(ctx.tmp / "outer" / "inner")
    return ["build", "--model", ckpt, "--out", "..", "--force"]


def _out_is_the_checkpoints_parent(ctx: Ctx) -> list:
    ckpt = Path(shutil.copytree(ctx.world.tiny_dir, ctx.tmp / "models" / "tiny"))
    return ["build", "--model", ckpt, "--out", ctx.tmp / "models", "--force"]


def _our_artifacts_without_force(ctx: Ctx) -> list:
    return ["build", "--model", ctx.ckpt(), "--out", ctx.art()]


def _our_artifacts_with_a_user_file(ctx: Ctx) -> list:
    folder = ctx.art()
    (folder / "my-notes.md").write_text("results of last week\n")
    return ["build", "--model", ctx.ckpt(), "--out", folder, "--force"]


def _hub_id_not_cached(command: str) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        ctx.env(HF_HUB_CACHE=str(ctx.tmp / "hf-cache"), HF_HUB_OFFLINE="1")
        hub = "meta-llama/Llama-3.2-11B-Vision-Instruct"
        return {
            "build": ["build", "--model", hub, "--out", ctx.tmp / "o"],
            "plan": ["plan", "--model", hub],
            "synth": ["synth", "--preset", hub, "--out", ctx.tmp / "s"],
            "validate": ["validate", ctx.shared, "--checkpoint", hub],
        }[command]

    return setup


def _check_full_without_memory(ctx: Ctx) -> list:
    from mllama_export.exporter import checkplan

    ctx.patch(checkplan, "available_memory", lambda: 1 << 30)
    return ctx.build_args("--check-depth", "full")


def _no_memory_even_for_a_reduced_copy(ctx: Ctx) -> list:
    from mllama_export.exporter import checkplan

    ctx.patch(checkplan, "available_memory", lambda: 1 << 28)
    return ctx.build_args("--precision", "fp16")


def _inspect_flipped(ctx: Ctx) -> list:
    folder = ctx.art()
    _flip_byte(folder / "onnx" / "vision.onnx")
    return ["inspect", folder]


def _inspect_missing_graph(ctx: Ctx) -> list:
    folder = ctx.art()
    (folder / "onnx" / "decode.onnx").unlink()
    return ["inspect", folder]


def _validate_meta(ctx: Ctx) -> list:
    folder = ctx.manifest(lambda m: m["model"].update(xattn_mask="meta"))
    return ["validate", folder, "--reference", "transformers"]


def _validate_other_checkpoint(ctx: Ctx) -> list:
    other = ctx.config(lambda c: c["text_config"].update(rms_norm_eps=1e-6))
    return ["validate", ctx.shared, "--checkpoint", other]


def _validate_evalset(*lines: str) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ["validate", ctx.shared, "--evalset", ctx.evalset(*lines)]

    return setup


def _validate_thresholds(change) -> Callable[[Ctx], list]:
    def setup(ctx: Ctx) -> list:
        return ["validate", ctx.shared, "--thresholds", ctx.thresholds(change)]

    return setup


def _images(ctx: Ctx, images_per_prompt: list[int]):
    rows = [
        [ctx.png(f"img-{r}-{i}.png") for i in range(n)] for r, n in enumerate(images_per_prompt)
    ]
    return preprocess(rows, ctx.runner.image_config)


def _gen_ids(prompts, images=None, max_new_tokens=2) -> Callable[[Ctx], Callable]:
    """images: how many images each row of the image batch holds."""

    def setup(ctx: Ctx) -> Callable:
        batch = _images(ctx, images) if images is not None else None
        return lambda: ctx.runner.generate_ids(prompts, batch, max_new_tokens)

    return setup


def _generate(prompt, images=(), max_new_tokens=2) -> Callable[[Ctx], Callable]:
    def setup(ctx: Ctx) -> Callable:
        return lambda: ctx.runner.generate(prompt, images, max_new_tokens)

    return setup


def _build_api(**options) -> Callable[[Ctx], Callable]:
    def setup(ctx: Ctx) -> Callable:
        opts = BuildOptions(model=str(ctx.ckpt()), out=ctx.tmp / "o", **options)
        return lambda: build(opts)

    return setup


def _gate_thresholds_without_fp32(ctx: Ctx) -> Callable:
    path = ctx.thresholds(lambda d: d["precisions"].pop("fp32"))
    cases = [EvalCase("one", [[500, 20, 21, 22]])]
    return lambda: run_gate(ctx.shared, thresholds=path, cases=cases, steps=1)


def _tokenizer_dir(name: str, data: str | None) -> Callable[[Ctx], Callable]:
    def setup(ctx: Ctx) -> Callable:
        folder = ctx.tmp / name
        folder.mkdir()
        if data is not None:
            (folder / "tokenizer.json").write_text(data)
        return lambda: Tokenizer.from_dir(folder)

    return setup


def _preprocessor_with(**extra) -> Callable[[Ctx], Callable]:
    def setup(ctx: Ctx) -> Callable:
        raw = json.loads((ctx.shared / "preprocessor_config.json").read_text())
        path = ctx.file("preprocessor_config.json", json.dumps({**raw, **extra}))
        return lambda: ImageProcessorConfig.from_file(path)

    return setup


def _config_api(change) -> Callable[[Ctx], Callable]:
    def setup(ctx: Ctx) -> Callable:
        folder = ctx.config(change)
        return lambda: MllamaConfig.from_hf_config(folder)

    return setup


# -- the table ------------------------------------------------------------------------------------


ROWS = [
    # -- synth ----------------------------------------------------------------------------------
    cli(
        "synth-out-is-a-file",
        lambda c: ["synth", "--out", c.file("f", "x")],
        "exists and is not an empty folder",
        "choose another --out",
    ),
    cli(
        "synth-out-under-a-file",
        lambda c: ["synth", "--out", c.file("f", "x") / "ckpt"],
        "is a file",
        "expected a folder",
    ),
    cli(
        "synth-out-not-empty",
        lambda c: ["synth", "--out", c.file("full/readme.txt", "x").parent],
        "is not an empty folder",
        "choose another --out",
    ),
    cli(
        "synth-zero-shards",
        lambda c: ["synth", "--out", c.tmp / "s", "--shards", "0"],
        "--shards 0",
        "expected at least 1",
    ),
    cli(
        "synth-unknown-preset",
        lambda c: ["synth", "--preset", "7b", "--out", c.tmp / "s"],
        "--preset '7b' is neither a checkpoint folder, a preset",
        "tiny, 11b, 90b",
    ),
    cli(
        "synth-hub-id-not-in-the-cache",
        _hub_id_not_cached("synth"),
        "as a Hugging Face Hub id it is not in the cache",
        "huggingface-cli download meta-llama/Llama-3.2-11B-Vision-Instruct",
    ),
    # -- build: options -------------------------------------------------------------------------
    cli(
        "build-model-neither-path-nor-preset",
        lambda c: ["build", "--model", c.tmp / "nowhere", "--out", c.tmp / "o"],
        "is neither a checkpoint folder, a preset",
        "tiny, 11b, 90b",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-model-is-a-file",
        lambda c: ["build", "--model", c.file("weights.safetensors", "x"), "--out", c.tmp / "o"],
        "is a file; expected a checkpoint folder",
        "a preset (tiny, 11b, 90b, llava-tiny, ",
        "llava-next-34b) or a Hugging Face Hub id",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-out-holds-user-files-without-force",
        lambda c: ["build", "--model", c.ckpt(), "--out", c.file("o/keep.txt", "x").parent],
        "holds files mllama-export did not write (keep.txt)",
        "Choose another --out",
    ),
    cli(
        "build-out-is-our-artifacts-without-force",
        _our_artifacts_without_force,
        "already exists",
        "pass --force to replace it",
    ),
    cli(
        "build-force-over-a-users-folder",
        _force_over_user_files,
        "holds files mllama-export did not write (thesis.txt)",
        "--force replaces only artifact folders written by `mllama-export build`",
    ),
    cli(
        "build-force-over-our-artifacts-with-a-user-file",
        _our_artifacts_with_a_user_file,
        "holds files mllama-export did not write (my-notes.md)",
        "Choose another --out",
    ),
    cli(
        "build-force-over-a-regular-file",
        _force_over_a_file,
        "notes.txt is a file",
        "expected a folder to write the artifacts into",
    ),
    cli(
        "build-out-is-the-current-folder",
        _out_is_the_current_folder,
        "--out . is the current folder",
        "Choose a new folder",
    ),
    cli(
        "build-out-holds-the-current-folder",
        _out_holds_the_current_folder,
        "--out .. is a folder holding the current folder",
        "Choose a new folder",
    ),
    cli(
        "build-out-is-the-checkpoints-parent",
        _out_is_the_checkpoints_parent,
        "holds --model",
        "replacing it would delete the checkpoint",
    ),
    cli(
        "build-hub-id-not-in-the-cache",
        _hub_id_not_cached("build"),
        "as a Hugging Face Hub id it is not in the cache",
        "hf-cache (HF_HUB_OFFLINE is set)",
    ),
    cli(
        "build-check-depth-full-without-the-memory",
        _check_full_without_memory,
        "--check-depth full needs",
        "use --check-depth auto",
    ),
    cli(
        "build-no-memory-even-for-a-reduced-check",
        _no_memory_even_for_a_reduced_copy,
        "even on a reduced copy of the model",
        "free memory, or build --precision bf16",
    ),
    cli(
        "build-fp8-exclude-vision-without-fp8-vision",
        lambda c: c.build_args(
            "--precision", "fp8", "--fp8-exclude", "vision.global_transformer.*"
        ),
        "'vision.global_transformer.*' matches none",
        "only in builds with --fp8-vision",
    ),
    cli(
        "build-out-under-a-file",
        lambda c: ["build", "--model", c.ckpt(), "--out", c.file("f", "x") / "o"],
        "is a file",
        "--out",
    ),
    cli(
        "build-out-is-the-model-folder",
        lambda c: ["build", "--model", c.ckpt(), "--out", c.tmp / "ckpt", "--force"],
        "--out",
        "--model",
    ),
    cli(
        "build-zero-batch",
        lambda c: c.build_args("--max-batch", "0"),
        "max-batch 0",
        "must be at least 1",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-negative-batch",
        lambda c: c.build_args("--max-batch", "-3"),
        "max-batch -3",
        "must be at least 1",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-zero-images",
        lambda c: c.build_args("--max-images", "0"),
        "max-images 0",
        "must be at least 1",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-zero-seq",
        lambda c: c.build_args("--max-seq-len", "0"),
        "max-seq-len 0",
        "must be at least 1",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-seq-of-one",
        lambda c: c.build_args("--max-seq-len", "1"),
        "max-seq-len below 2",
        "a prompt token and a new token",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-seq-beyond-positions",
        lambda c: c.build_args("--max-seq-len", "200000"),
        "max-seq-len 200000",
        "the model's 131072 positions",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-opset-too-old",
        lambda c: c.build_args("--opset", "18"),
        "opset 18",
        "supported: 19 to 21",
        marks=AFTER_LOCK,
    ),
    cli(
        "build-bad-precision",
        lambda c: c.build_args("--precision", "fp64"),
        "Invalid value for '--precision'",
        "'fp64' is not one of",
    ),
    cli(
        "build-batch-not-a-number",
        lambda c: c.build_args("--max-batch", "four"),
        "Invalid value for '--max-batch'",
        "'four' is not a valid integer",
    ),
    api(
        "build-precision-unknown",
        _build_api(precision="fp64"),
        "precision 'fp64'",
        "available: fp32",
        marks=AFTER_LOCK,
    ),
    api(
        "build-xattn-mask-unknown",
        _build_api(xattn_mask="both"),
        "xattn-mask 'both'",
        "available: meta, hf",
        marks=AFTER_LOCK,
    ),
    # -- build: checkpoints ---------------------------------------------------------------------
    cli(
        "ckpt-missing-shard",
        _missing_shard,
        "names shards that do not exist",
        "safetensors files present",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-truncated-shard",
        _truncated_shard,
        "is truncated or corrupt",
        "expected a complete safetensors file",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-corrupt-header",
        _corrupt_header,
        "not a readable safetensors file",
        "expected a complete safetensors file",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-index-names-missing-shard",
        _index_names_missing_shard,
        "model-00099-of-00099.safetensors",
        "do not exist",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-index-not-json",
        _index_not_json,
        "cannot read",
        "expected a JSON object with a 'weight_map'",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-pickled-weights",
        _pickled,
        "never unpickles",
        "Convert them to safetensors",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-wrong-tensor-shape",
        _tensors_build(lambda t: t.update({"language_model.model.norm.weight": torch.ones(65)})),
        "has shape [65]",
        "the config implies [64]",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-wrong-tensor-dtype",
        _tensors_build(
            lambda t: t.update({"vision_model.class_embedding": torch.zeros(32, dtype=torch.int32)})
        ),
        "is I32",
        "expected float32, float16 or bfloat16",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-extra-tensor",
        _tensors_build(lambda t: t.update({"language_model.model.extra.weight": torch.ones(2)})),
        "1 unexpected ['language_model.model.extra.weight']",
        "expected exactly the tensors",
        marks=AFTER_LOCK,
    ),
    cli(
        "ckpt-missing-tensor",
        _tensors_build(lambda t: t.pop("language_model.model.norm.weight")),
        "1 tensors missing ['language_model.model.norm.weight']",
        "expected exactly the tensors",
        marks=AFTER_LOCK,
    ),
    api(
        "ckpt-no-weights",
        _config_only,
        "has neither model.safetensors nor model.safetensors.index.json",
        "files present",
    ),
    api(
        "ckpt-is-a-file",
        lambda c: partial(load_model, c.file("model.safetensors", "x")),
        "is a file",
        "expected a checkpoint folder",
    ),
    api(
        "ckpt-missing",
        lambda c: lambda: MllamaConfig.from_hf_config(c.tmp / "gone"),
        "does not exist",
        "expected a Hugging Face checkpoint folder",
    ),
    # -- config.json, through plan (which reads nothing else) and the API -----------------------
    cli(
        "config-other-architecture",
        _plan_config(lambda r: r.update(model_type="gpt2")),
        "model_type 'gpt2'",
        "expected 'mllama' (a Llama 3.2 Vision checkpoint such as meta-llama/Llama-3.2-11B-Vision)"
        " or 'llava' or 'llava_next'",
    ),
    cli(
        "config-unknown-key",
        _plan_config(lambda r: r["text_config"].update(sliding_window=4096)),
        "text_config has unknown key(s) ['sliding_window']",
        "expected only",
    ),
    cli(
        "config-missing-key",
        _plan_config(lambda r: r["vision_config"].pop("patch_size")),
        "vision_config is missing required key(s) ['patch_size']",
        "keys present",
    ),
    cli(
        "config-wrong-type",
        _plan_config(lambda r: r["text_config"].update(hidden_size="sixty-four")),
        "text_config.hidden_size is 'sixty-four'",
        "expected a positive integer",
    ),
    cli(
        "config-not-json",
        lambda c: ["plan", "--model", c.file("cfg/config.json", "{'model_type': 'mllama'}").parent],
        "cannot read",
        "expected a JSON object",
    ),
    api(
        "config-is-a-list",
        lambda c: partial(MllamaConfig.from_hf_config, c.file("c.json", "[]")),
        "holds list",
        "expected a JSON object",
    ),
    api(
        "config-bad-aspect-ratios",
        _config_api(lambda r: r["vision_config"].update(supported_aspect_ratios=[1, 2])),
        "supported_aspect_ratios is [1, 2]",
        "pairs of integers",
    ),
    api(
        "config-inconsistent-sizes",
        _config_api(lambda r: r["vision_config"].update(vision_output_dim=100)),
        "vision_output_dim 100",
        "hidden_size 32 x (1 + 2 intermediate layers)",
    ),
    # -- plan ------------------------------------------------------------------------------------
    cli(
        "plan-model-neither",
        lambda c: ["plan", "--model", c.tmp / "nowhere"],
        "is neither a checkpoint folder, a preset (tiny, 11b, 90b, llava-tiny, ",
        "nor a Hugging Face Hub id",
    ),
    cli(
        "plan-hub-id-not-in-the-cache",
        _hub_id_not_cached("plan"),
        "as a Hugging Face Hub id it is not in the cache",
        "or pass a checkpoint folder",
    ),
    cli(
        "plan-precision-unknown",
        lambda c: ["plan", "--model", "11b", "--precision", "int4"],
        "Invalid value for '--precision'",
        "'fp32', 'fp16', 'bf16', 'fp8'",
    ),
    cli(
        "plan-artifacts-with-a-broken-manifest",
        lambda c: ["plan", "--model", c.manifest(lambda m: m.pop("limits"))],
        "missing required key(s) ['limits']",
        "rebuild the artifacts",
    ),
    cli(
        "plan-zero-batch",
        lambda c: ["plan", "--model", "11b", "--max-batch", "0"],
        "max_batch must be a positive integer",
        "got 0",
    ),
    cli(
        "plan-prompt-beyond-seq",
        lambda c: ["plan", "--model", "11b", "--prompt-len", "9000"],
        "--prompt-len 9000 exceeds --max-seq-len 512 (build's default)",
        "or pass a larger --max-seq-len",
    ),
    cli(
        "plan-too-many-tiles",
        lambda c: ["plan", "--model", "11b", "--tiles", "5"],
        "tiles 5 exceeds",
        "expected 1..4",
    ),
    cli(
        "plan-seq-beyond-positions",
        lambda c: ["plan", "--model", "11b", "--max-seq-len", "200000"],
        "max_seq_len 200000 exceeds",
        "expected 1..131072",
    ),
    # -- artifacts ------------------------------------------------------------------------------
    cli(
        "art-missing",
        lambda c: ["run", c.tmp / "missing", "--token-ids", "500,1"],
        "artifact folder",
        "does not exist",
    ),
    cli(
        "art-is-a-file",
        lambda c: ["run", c.art() / "manifest.json", "--token-ids", "1"],
        "is a file",
        "expected an artifact folder",
    ),
    cli(
        "art-unreadable",
        _unreadable,
        "permission denied",
        "expected a folder this user may read",
        marks=ROOT_SKIP,
    ),
    cli(
        "art-no-manifest",
        lambda c: ["run", c.ckpt(), "--token-ids", "500,1"],
        "has no manifest.json",
        "expected a folder written by `mllama-export build`",
    ),
    cli(
        "art-manifest-not-json",
        _manifest_text('{"format": "mllama-export/1",'),
        "cannot read",
        "expected the JSON manifest",
    ),
    cli(
        "art-manifest-not-an-object",
        _manifest_text("[]"),
        "holds a JSON list",
        "expected the JSON object",
    ),
    cli(
        "art-old-format",
        _run_on_manifest(lambda m: m.update(format="mllama-export/0")),
        "has format 'mllama-export/0'",
        "reads 'mllama-export/1'",
    ),
    cli(
        "art-future-format",
        _run_on_manifest(lambda m: m.update(format="mllama-export/2")),
        "has format 'mllama-export/2'",
        "a newer version; upgrade mllama-export",
    ),
    cli(
        "art-other-major-version",
        _run_on_manifest(lambda m: m["versions"].update({"mllama-export": "97.0.1"})),
        "built by mllama-export 97.0.1",
        f"runs artifacts of major version {_installed_major()} only",
    ),
    cli(
        "art-manifest-missing-key",
        _run_on_manifest(lambda m: m.pop("limits")),
        "missing required key(s) ['limits']",
        "rebuild the artifacts",
    ),
    cli(
        "art-manifest-bad-limits",
        _run_on_manifest(lambda m: m["limits"].update(max_batch="4")),
        "limits.max_batch is '4'",
        "expected an integer",
    ),
    cli(
        "art-incomplete-build",
        _incomplete,
        "holds an incomplete build",
        "run `mllama-export build` again",
    ),
    cli(
        "art-listed-file-missing",
        _delete("onnx/text.onnx.data"),
        "onnx/text.onnx.data is listed in the manifest but missing",
        "rebuild the artifacts",
    ),
    cli(
        "art-tampered-file",
        _tampered,
        "onnx/vision.onnx does not match the sha256",
        "rebuild the artifacts",
    ),
    cli(
        "art-manifest-file-outside",
        _run_on_manifest(lambda m: m["files"].update({"../outside.bin": "0" * 64})),
        "../outside.bin is a manifest entry",
        "points outside the folder",
    ),
    cli(
        "art-external-data-outside",
        _run_on_onnx("decode", lambda m: _set_location(m, "../../outside.onnx.data")),
        "points outside",
        "refusing to load it",
    ),
    cli(
        "art-opset-from-the-future",
        _run_on_onnx("prefill", _set_opset(999)),
        "opset 999",
        "cannot run",
        "upgrade onnxruntime",
    ),
    cli(
        "art-ir-from-the-future",
        _run_on_onnx("vision", _set_ir(99)),
        "IR version 99",
        "max supported IR version",
        "upgrade onnxruntime",
    ),
    cli(
        "inspect-flipped-byte",
        _inspect_flipped,
        "1 of 12 files do not match the manifest (onnx/vision.onnx)",
        "rebuild the artifacts",
    ),
    cli(
        "inspect-missing-graph",
        _inspect_missing_graph,
        "1 of 12 files do not match the manifest (onnx/decode.onnx)",
        "rebuild the artifacts",
    ),
    cli(
        "inspect-missing-folder",
        lambda c: ["inspect", c.tmp / "nothing-here"],
        "artifact folder",
        "does not exist",
    ),
    cli(
        "inspect-manifest-without-graph-file",
        lambda c: ["inspect", c.manifest(lambda m: m["graphs"]["decode"].pop("file"))],
        "graphs.decode is missing required key(s) ['file']",
        "a path like onnx/",
    ),
    cli(
        "inspect-manifest-without-source",
        lambda c: ["inspect", c.manifest(lambda m: m["model"].pop("source"))],
        "lacks or mangles the entry 'source'",
        "expected a manifest written by `mllama-export build`",
    ),
    api(
        "artifacts-unknown-backend",
        lambda c: lambda: Runner.from_artifacts(c.shared, "tvm"),
        "unknown backend 'tvm'",
        "available: onnxruntime, onnx-reference, tensorrt",
    ),
    api(
        "artifacts-unknown-device",
        lambda c: lambda: Runner.from_artifacts(c.shared, device="tpu"),
        "unknown device 'tpu'",
        "available: cpu, cuda",
    ),
    # -- run: requests outside the artifacts' limits ------------------------------------------
    cli(
        "run-prompt-and-token-ids",
        lambda c: ["run", c.shared, "--prompt", "x", "--token-ids", "1"],
        "give exactly one of --prompt and --token-ids",
    ),
    cli(
        "run-chat-without-prompt",
        lambda c: ["run", c.shared, "--token-ids", "500,1", "--chat"],
        "--chat needs --prompt",
        "token ids are used as given",
    ),
    cli(
        "run-token-ids-not-integers",
        lambda c: ["run", c.shared, "--token-ids", "500;12"],
        "--token-ids '500;12'",
        "expected integers separated by commas",
    ),
    cli(
        "run-token-ids-empty",
        lambda c: ["run", c.shared, "--token-ids", " , "],
        "an empty prompt",
        "at least one token is needed",
    ),
    cli(
        "run-token-id-beyond-vocab",
        lambda c: ["run", c.shared, "--token-ids", "500,99999"],
        "token id(s) [99999]",
        "expected ids in 0..519",
    ),
    cli(
        "run-negative-token-id",
        lambda c: ["run", c.shared, "--token-ids", "500,-3"],
        "token id(s) [-3]",
        "expected ids in 0..519",
    ),
    cli(
        "run-empty-prompt",
        lambda c: ["run", c.shared, "--prompt", ""],
        "the prompt is empty",
        "expected some text",
    ),
    cli(
        "run-zero-new-tokens",
        lambda c: ["run", c.shared, "--token-ids", "500,1", "--max-new-tokens", "0"],
        "max_new_tokens 0",
        "must be at least 1",
    ),
    cli(
        "run-past-beyond-max-seq-len",
        lambda c: ["run", c.shared, "--token-ids", "500,1", "--max-new-tokens", "600"],
        "a prompt of 2 tokens plus 600 new tokens",
        "built for 512 in all",
    ),
    cli(
        "run-prompt-leaves-no-room",
        lambda c: ["run", c.shared, "--token-ids", ",".join(["20"] * 512), "--max-new-tokens", "1"],
        "a prompt of 512 tokens plus 1 new tokens",
        "built for 512 in all",
    ),
    cli(
        "run-negative-temperature",
        lambda c: ["run", c.shared, "--prompt", "x", "--temperature", "-1"],
        "invalid sampling: temperature -1.0",
        "expected a finite number >= 0",
    ),
    cli(
        "run-temperature-not-a-number",
        lambda c: ["run", c.shared, "--prompt", "x", "--temperature", "nan"],
        "invalid sampling: temperature nan",
        "0 is greedy",
    ),
    cli(
        "run-negative-top-k",
        lambda c: ["run", c.shared, "--prompt", "x", "--top-k", "-2"],
        "top_k -2",
        "expected an integer >= 0",
    ),
    cli(
        "run-top-p-above-one",
        lambda c: ["run", c.shared, "--prompt", "x", "--top-p", "1.5"],
        "top_p 1.5",
        "expected 0 < top_p <= 1",
    ),
    cli(
        "run-top-p-zero",
        lambda c: ["run", c.shared, "--prompt", "x", "--top-p", "0"],
        "top_p 0.0",
        "1 keeps every token",
    ),
    cli(
        "run-negative-seed",
        lambda c: ["run", c.shared, "--prompt", "x", "--temperature", "0.8", "--seed", "-1"],
        "seed -1",
        "expected an integer >= 0, or none",
    ),
    cli(
        "run-device-cuda-without-cuda",
        lambda c: ["run", c.shared, "--prompt", "x", "--device", "cuda"],
        "--device cuda",
        "use --device cpu",
        marks=NO_CUDA,
    ),
    cli(
        "run-bf16-on-onnx-runtimes-cpu",
        _run_on_manifest(lambda m: m.update(io_dtype="bfloat16")),
        "holds bf16 graphs, which ONNX Runtime's CPU provider cannot run",
        "use --backend onnx-reference",
    ),
    api(
        "sampling-temperature-negative",
        lambda c: partial(Sampling, temperature=-0.5),
        "invalid sampling: temperature -0.5",
        "expected a finite number >= 0",
    ),
    api(
        "sampling-top-k-not-an-integer",
        lambda c: partial(Sampling, temperature=0.7, top_k=2.5),
        "top_k 2.5",
        "expected an integer >= 0",
    ),
    cli(
        "run-max-new-tokens-not-a-number",
        lambda c: ["run", c.shared, "--prompt", "x", "--max-new-tokens", "many"],
        "Invalid value for '--max-new-tokens'",
        "'many' is not a valid integer",
    ),
    cli(
        "run-tensorrt-without-engines",
        lambda c: ["run", c.shared, "--prompt", "x", "--backend", "tensorrt"],
        "has no TensorRT engines",
    ),
    # -- run: images --------------------------------------------------------------------------
    cli(
        "run-more-image-tokens-than-images",
        lambda c: ["run", c.shared, "--prompt", IMG * 2 + "hi", "--image", c.png()],
        "holds 2 <|image|> tokens but 1 image was given",
        "give one image per <|image|> token",
    ),
    cli(
        "run-token-ids-without-image-token",
        lambda c: ["run", c.shared, "--token-ids", "500,20", "--image", c.png()],
        "--token-ids hold 0 <|image|> token(s) (id 512) but 1 --image",
        "expected one 512 per image",
    ),
    cli(
        "run-too-many-images",
        lambda c: (
            ["run", c.shared, "--prompt", "hi"]
            + [a for i in range(3) for a in ("--image", c.png(f"i{i}.png"))]
        ),
        "3 images were given",
        "built for at most 2 per prompt",
    ),
    cli(
        "run-too-many-images-with-token-ids",
        lambda c: (
            ["run", c.shared, "--token-ids", "500,512,512,512,20"]
            + [a for i in range(3) for a in ("--image", c.png(f"i{i}.png"))]
        ),
        "3 images were given",
        "built for at most 2 per prompt",
    ),
    cli("image-missing", _run_image("missing.png", None), "no such file", "an existing image file"),
    cli(
        "image-truncated",
        _run_image("cut.png", png_bytes(64, 64)[:600]),
        "the file is truncated",
        "expected an image file Pillow can decode",
    ),
    cli(
        "image-not-an-image",
        _run_image("text.png", b"this is text, not a picture\n"),
        "not in a recognised image format",
        "expected an image file Pillow can decode",
    ),
    cli(
        "image-zero-bytes",
        _run_image("empty.png", b""),
        "the file is empty (0 bytes)",
        "expected an image file Pillow can decode",
    ),
    cli(
        "image-bomb",
        _run_image("bomb.png", bomb_png(30000)),
        "decompression bomb",
        "expected at most 178,956,970 pixels",
    ),
    cli(
        "image-is-a-folder",
        lambda c: ["run", c.shared, "--prompt", "x", "--image", c.file("d/x", "x").parent],
        "it is a directory",
        "expected an image file",
    ),
    # -- the runner's Python API ------------------------------------------------------------------
    api(
        "generate-ids-batch-too-large",
        _gen_ids([[500, 1]] * 5),
        "a batch of 5 prompts",
        "built for 1..4",
    ),
    api("generate-ids-no-prompts", _gen_ids([]), "a batch of 0 prompts", "built for 1..4"),
    api(
        "generate-ids-empty-prompt",
        _gen_ids([[500, 1], []]),
        "an empty prompt",
        "at least one token is needed",
    ),
    api(
        "generate-ids-flat-list",
        _gen_ids([500, 1, 2]),
        "prompts is list [500, 1, 2]",
        "expected a list of token-id lists",
    ),
    api(
        "generate-ids-float-token",
        _gen_ids([[500, 1.5]]),
        "prompt 0 holds 1.5 (float)",
        "expected integer token ids",
    ),
    api(
        "generate-ids-images-for-other-batch",
        _gen_ids([[500, 512, 1]], images=[1, 1]),
        "images for 2 prompts",
        "but 1 prompts",
    ),
    api(
        "generate-ids-too-many-images",
        _gen_ids([[500, 512, 512, 512, 1]], images=[3]),
        "3 images per prompt",
        "built for 2",
    ),
    api(
        "generate-past-beyond-max-seq-len",
        _generate("hi", max_new_tokens=600),
        "plus 600 new tokens",
        "built for 512 in all",
    ),
    api(
        "generate-prompt-not-text",
        _generate(1234),
        "prompt is a int",
        "expected a string or a list of chat messages",
    ),
    api(
        "generate-empty-conversation",
        _generate([]),
        "empty conversation",
        "expected at least one {'role': 'user'",
    ),
    api(
        "generate-message-without-role",
        _generate([{"content": "hi"}]),
        "Chat message 0 is {'content': 'hi'}",
        "expected a dict with a 'role'",
    ),
    api(
        "generate-chat-image-part-without-image",
        _generate(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        ),
        "hold 1 <|image|> token (one per image part) but 0 images were given",
        "give one image per image part",
    ),
    api(
        "generate-images-not-a-list",
        _generate("hi", images=42),
        "images is int 42",
        "expected a file path, bytes, a PIL.Image.Image, or a list",
    ),
    api(
        "generate-image-of-unknown-type",
        _generate("hi", images=[3.5]),
        "cannot read image of type float",
        "expected a file path, bytes or a PIL.Image.Image",
    ),
    api(
        "preprocess-not-rows",
        lambda c: partial(preprocess, str(c.png()), c.runner.image_config),
        "images is str",
        "expected a list of rows",
    ),
    api(
        "preprocess-no-images",
        lambda c: lambda: preprocess([[], []], c.runner.image_config),
        "no images to preprocess",
        "expected at least one",
    ),
    api(
        "preprocess-empty-bytes",
        lambda c: lambda: preprocess([[b""]], c.runner.image_config),
        "cannot read image <0 bytes>: the data is empty",
        "expected an image file Pillow",
    ),
    api(
        "preprocessor-config-unknown-key",
        _preprocessor_with(crop_size=10),
        "unknown key(s) ['crop_size']",
        "expected only",
    ),
    api(
        "tokenizer-missing",
        _tokenizer_dir("no-tokenizer", None),
        "No tokenizer.json",
        "expected a Hugging Face checkpoint folder",
    ),
    api(
        "tokenizer-not-json",
        _tokenizer_dir("bad-json", "{"),
        "is not valid JSON",
        "expected a JSON file",
    ),
    api(
        "tokenizer-not-a-tokenizer",
        _tokenizer_dir("not-tok", '{"a": 1}'),
        "is not a valid tokenizer",
        "expected the tokenizer.json of a Hugging Face",
    ),
    api(
        "load-model-unknown-semantics",
        lambda c: lambda: load_model(c.world.tiny_dir, semantics="llava"),
        "unknown mask semantics 'llava'",
        "expected one of ('meta', 'hf')",
    ),
    # -- validate -------------------------------------------------------------------------------
    cli(
        "validate-thresholds-not-json",
        lambda c: ["validate", c.shared, "--thresholds", c.file("t.json", "{limits: 1}")],
        "is not valid JSON",
        "at line 1 column 2",
    ),
    cli(
        "validate-thresholds-unknown-metric",
        _validate_thresholds(lambda d: d["precisions"]["fp32"]["logits"].update(max_foo=1)),
        "logits has unknown key(s) ['max_foo']",
        "expected only ['max_rel_l2'",
    ),
    cli(
        "validate-thresholds-wrong-type",
        _validate_thresholds(
            lambda d: d["precisions"]["fp32"]["vision"].update(max_rel_l2="small")
        ),
        "vision.max_rel_l2 is 'small'",
        "expected a finite number >= 0",
    ),
    cli(
        "validate-thresholds-missing",
        lambda c: ["validate", c.shared, "--thresholds", c.tmp / "none.json"],
        "thresholds file",
        "does not exist",
    ),
    api(
        "gate-thresholds-without-the-precision",
        _gate_thresholds_without_fp32,
        "no drift thresholds for precision 'fp32'",
        "it has: fp16, bf16, fp8",
    ),
    api(
        "gate-unknown-reference",
        lambda c: lambda: run_gate(c.shared, reference="onnx"),
        "unknown reference 'onnx'",
        "available: graphs, transformers",
    ),
    cli(
        "validate-evalset-without-prompts",
        lambda c: ["validate", c.shared, "--evalset", c.file("es/readme.txt", "x").parent],
        "no prompts.jsonl in",
        "expected a folder with prompts.jsonl",
    ),
    cli(
        "validate-evalset-malformed-line",
        _validate_evalset('{"prompt": "fine"}', "# a comment", '{"prompt": "cut'),
        "prompts.jsonl line 3: not valid JSON",
        "expected one JSON object per line",
    ),
    cli(
        "validate-evalset-image-missing",
        _validate_evalset('{"prompt": "What is it?", "images": ["cat.png"]}'),
        "line 1: image file(s) not found",
        "expected image files beside prompts.jsonl",
    ),
    cli(
        "validate-transformers-reference-on-meta-artifacts",
        _validate_meta,
        "judges artifacts built with --xattn-mask hf only",
        "Use --reference graphs, or rebuild with --xattn-mask hf",
    ),
    cli(
        "validate-too-many-steps",
        lambda c: ["validate", c.shared, "--steps", "600"],
        "built for 512 tokens in all",
        "use fewer --steps",
    ),
    cli(
        "validate-negative-steps",
        lambda c: ["validate", c.shared, "--steps", "-1"],
        "Invalid value for '--steps'",
        "-1 is not in the range x>=0",
    ),
    cli(
        "validate-checkpoint-of-another-model",
        _validate_other_checkpoint,
        "has a different config",
        "pass --checkpoint with the checkpoint they were built from",
    ),
    cli(
        "validate-source-gone",
        lambda c: [
            "validate",
            c.manifest(lambda m: m["model"].update(source="/gone/ckpt", checkpoint="/gone/ckpt")),
        ],
        "model.checkpoint '/gone/ckpt' is not a folder here",
        "pass --checkpoint PATH",
    ),
    cli(
        "validate-checkpoint-hub-id-not-in-the-cache",
        _hub_id_not_cached("validate"),
        "--checkpoint 'meta-llama/Llama-3.2-11B-Vision-Instruct' is not a folder here",
        "not in the cache",
    ),
    cli(
        "sensitivity-vision-layers-without-fp8-vision",
        lambda c: ["sensitivity", c.fp8_manifest(), "--layers", "vision.*"],
        "--layers 'vision.*' matches none",
        "only in builds with --fp8-vision",
    ),
    cli(
        "sensitivity-on-fp32-artifacts",
        lambda c: ["sensitivity", c.shared],
        "needs artifacts built with --precision fp8",
        "these are 'fp32'",
    ),
    *LLAVA_ROWS,
]


# -- the test -------------------------------------------------------------------------------------


_DIGESTS: dict[tuple, str] = {}


def _sha256(path: str, info: os.stat_result) -> str:
    # Keyed by inode, size, mtime and ctime: any write changes ctime, which no caller can set
    # back, so a cached digest is never stale; the fixtures are hashed once, not per row.
    key = (path, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _DIGESTS:
        try:
            _DIGESTS[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            return "unreadable"
    return _DIGESTS[key]


def snapshot(roots: list[Path]) -> dict[str, tuple]:
    """(kind, size, mtime, sha256) of everything under each root, symlinks not followed."""
    found: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, onerror=lambda err: None):
            for name in dirnames:
                found[os.path.join(dirpath, name)] = ("dir",)
            for name in filenames:
                path = os.path.join(dirpath, name)
                info = os.lstat(path)
                found[path] = ("file", info.st_size, info.st_mtime_ns, _sha256(path, info))
    return found


def assert_unchanged(before: dict, after: dict) -> None:
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    if not (added or removed or changed):
        return
    if not removed and not changed and all(Path(p).name.endswith(".lock") for p in added):
        raise LeftoverLock(f"a refused build left its lock file(s): {added}")
    raise AssertionError(f"files changed: added {added}, removed {removed}, changed {changed}")


@pytest.mark.parametrize("row", ROWS)
def test_a_bad_input_gets_one_clear_error_and_changes_nothing(
    row: Row, world, tmp_path, monkeypatch
):
    monkeypatch.delenv("MLLAMA_EXPORT_DEBUG", raising=False)
    monkeypatch.delenv("MLLAMA_EXPORT_KILL_AT", raising=False)

    def no_export(*args, **kwargs):
        raise AssertionError("the build went on to export: the bad input was not refused")

    monkeypatch.setattr(
        importlib.import_module("mllama_export.exporter.build"), "StreamingExport", no_export
    )
    ctx = Ctx(tmp_path, world)
    try:
        action = row.setup(ctx)
        watched = [tmp_path, *world.folders]
        before = snapshot(watched)
        if row.cli:
            result = CliRunner().invoke(main, [str(a) for a in action])
            message = result.output
            assert result.exit_code == 2, (message, result.exception)
            assert isinstance(result.exception, SystemExit), result.exception
            assert "Traceback" not in message
            # the refusal is the output's last line, and its only error line
            errors = [line for line in message.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and message.rstrip().endswith(errors[0]), message
        else:
            with pytest.raises(MllamaExportError) as info:
                action()
            message = str(info.value)
        for fragment in row.fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        assert_unchanged(before, snapshot(watched))
    finally:
        for cleanup in ctx.cleanups:
            cleanup()


def test_the_table_is_large_and_its_rows_distinct():
    ids = [p.id for p in ROWS]
    assert len(ids) == len(set(ids)) and len(ids) >= 150
    fragments = [p.values[0].fragments for p in ROWS]
    assert len(set(fragments)) >= 0.9 * len(fragments)  # a handful share one message

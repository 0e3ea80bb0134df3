"""LLaVA's rows of the bad-input table (tests/test_bad_inputs.py runs them with Mllama's):
LLaVA 1.5 and LLaVA-NeXT checkpoints written by `synth`, and llava-next-tiny artifacts built
from one of them, so that anyres images (token counts that depend on the image's size) meet
the same refusals as every other input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bad_input_table import api, cli
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mllama_export.cli import main
from mllama_export.engines.runner import Runner

IMAGE_TOKEN = 403  # both tiny presets'
CLIP_TOWER = "openai/clip-vit-large-patch14-336"


@dataclass
class LlavaWorld:
    ckpt: dict[str, Path]  # "llava": llava-tiny, "llava_next": llava-next-tiny, one file each
    artifacts: Path  # llava-next-tiny fp32, built from ckpt["llava_next"] (max_images 2)
    shared: Path  # a copy of the artifacts, for rows that only read them
    runner: Any  # loaded from `shared`

    @property
    def folders(self) -> list[Path]:
        return [*self.ckpt.values(), self.artifacts, self.shared]


def _cli(*args) -> None:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def llava_world(root: Path) -> LlavaWorld:
    ckpt = {"llava": root / "llava-tiny", "llava_next": root / "llava-next-tiny"}
    _cli("synth", "--preset", "llava-tiny", "--out", ckpt["llava"])
    _cli("synth", "--preset", "llava-next-tiny", "--out", ckpt["llava_next"])
    artifacts = root / "art"
    _cli("build", "--model", ckpt["llava_next"], "--out", artifacts)
    shared = Path(shutil.copytree(artifacts, root / "shared"))
    return LlavaWorld(ckpt, artifacts, shared, Runner.from_artifacts(shared))


# -- copies that a row changes --------------------------------------------------------------------


def _ckpt(ctx, kind: str) -> Path:
    return Path(shutil.copytree(ctx.world.llava.ckpt[kind], ctx.tmp / "ckpt"))


def _art(ctx) -> Path:
    return Path(shutil.copytree(ctx.world.llava.artifacts, ctx.tmp / "art"))


def _edit_json(path: Path, change: Callable[[dict], Any]) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _build(kind: str, *extra, config=None, tensors=None) -> Callable[[Any], list]:
    """`build` on a copy of a tiny checkpoint, its config.json or its tensors changed."""

    def setup(ctx) -> list:
        folder = _ckpt(ctx, kind)
        if config is not None:
            _edit_json(folder / "config.json", config)
        if tensors is not None:
            state = load_file(folder / "model.safetensors")
            tensors(state)
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return ["build", "--model", folder, "--out", ctx.tmp / "o", *extra]

    return setup


def _top(**values) -> Callable[[dict], None]:
    return lambda raw: raw.update(values)


def _text(**values) -> Callable[[dict], None]:
    return lambda raw: raw["text_config"].update(values)


def _vision(**values) -> Callable[[dict], None]:
    return lambda raw: raw["vision_config"].update(values)


def _original(raw: dict) -> None:
    raw.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"])
    raw.update(mm_vision_tower=CLIP_TOWER, mm_projector_type="mlp2x_gelu")


def _original_next(raw: dict) -> None:
    raw.update(mm_vision_tower=CLIP_TOWER, image_aspect_ratio="anyres")


def _run(*extra, images: tuple[tuple[int, int], ...] = ()) -> Callable[[Any], list]:
    """`run` on the shared artifacts with PNGs of these (width, height)."""

    def setup(ctx) -> list:
        args = ["run", ctx.world.llava.shared, *extra]
        for i, size in enumerate(images):
            args += ["--image", ctx.png(f"img-{i}.png", size)]
        return args

    return setup


def _run_on_edited(name: str, change: Callable[[dict], Any]) -> Callable[[Any], list]:
    """`run` on an artifact copy whose file `name` was edited, with a fresh manifest (what a
    user who copied another checkpoint's processor files over them would have)."""

    def setup(ctx) -> list:
        folder = _art(ctx)
        _edit_json(folder / name, change)
        ctx.rebuilt_manifest(folder)
        return ["run", folder, "--prompt", "What is it?", "--image", ctx.png()]

    return setup


def _without(name: str) -> Callable[[Any], list]:
    def setup(ctx) -> list:
        folder = _art(ctx)
        (folder / name).unlink()
        ctx.rebuilt_manifest(folder)
        return ["run", folder, "--prompt", "What is it?", "--image", ctx.png()]

    return setup


def _generate_ids(prompts, images_for: str | None, *, wrap=None) -> Callable[[Any], Callable]:
    """generate_ids with the images that encoding `images_for` (one PNG per <image>) gives."""

    def setup(ctx) -> Callable:
        runner = ctx.world.llava.runner
        images = None
        if images_for is not None:
            pngs = [ctx.png(f"img-{i}.png") for i in range(images_for.count("<image>"))]
            images = runner.encode(images_for, pngs)[1]
        if wrap is not None:
            images = wrap(images)
        return lambda: runner.generate_ids(prompts, images, 2)

    return setup


def _generate(prompt, images: int = 0) -> Callable[[Any], Callable]:
    def setup(ctx) -> Callable:
        pngs = [ctx.png(f"img-{i}.png") for i in range(images)]
        return lambda: ctx.world.llava.runner.generate(prompt, pngs, 2)

    return setup


def _validate_evalset(*lines: str, images: tuple[str, ...] = ()) -> Callable[[Any], list]:
    def setup(ctx) -> list:
        folder = ctx.evalset(*lines)
        for name in images:
            ctx.png(f"evalset/{name}")
        return ["validate", ctx.world.llava.shared, "--evalset", folder]

    return setup


def _patched_memory(total: int, *extra) -> Callable[[Any], list]:
    def setup(ctx) -> list:
        from mllama_export.exporter import llava_checkplan

        ctx.patch(llava_checkplan, "available_memory", lambda: total)
        return _build("llava", *extra)(ctx)

    return setup


def _pop(name: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(name)


def _put(name: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    return lambda tensors: tensors.update({name: torch.zeros(shape)})


PROJ = "multi_modal_projector.linear_2.weight"
TOWER_1 = "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
# one long image and a square one: NeXT's tokens per image depend on the size
WIDE, SQUARE = (400, 30), (40, 30)


ROWS = [
    # -- synth ----------------------------------------------------------------------------------
    cli(
        "llava-synth-global-layers",
        lambda c: ["synth", "--preset", "llava-tiny", "--global-layers", "1", "--out", c.tmp / "s"],
        "LLaVA has no global vision layers or cross-attention layers",
        "use --text-layers and --vision-layers",
    ),
    cli(
        "llava-synth-more-text-layers-than-the-preset",
        lambda c: ["synth", "--preset", "llava-tiny", "--text-layers", "9", "--out", c.tmp / "s"],
        "--text-layers 9",
        "between 1 and the original 4 layers",
    ),
    cli(
        "llava-synth-more-vision-layers-than-the-preset",
        lambda c: [
            "synth",
            "--preset",
            "llava-next-tiny",
            "--vision-layers",
            "9",
            "--out",
            c.tmp / "s",
        ],
        "--vision-layers 9",
        "between 1 and the original 3 layers",
    ),
    # -- build: the checkpoint's config ---------------------------------------------------------
    cli(
        "llava-config-original-repository",
        _build("llava", config=_original),
        "original LLaVA repository's format (model_type='llava_llama', LlavaLlamaForCausalLM",
        f"vision tower '{CLIP_TOWER}' by name",
        "transformers' src/transformers/models/llava/convert_llava_weights_to_hf.py",
    ),
    cli(
        "llava-config-original-repository-anyres",
        _build("llava_next", config=_original_next),
        "(mm_vision_tower; vision tower",
        "llava_next/convert_llava_next_weights_to_hf.py",
    ),
    cli(
        "llava-config-unknown-text-key",
        _build("llava", config=_text(frobnicate=1)),
        "unknown keys ['frobnicate']",
    ),
    cli(
        "llava-config-missing-image-token",
        _build("llava", config=lambda raw: raw.pop("image_token_index")),
        "config.json is missing the key 'image_token_index'",
        "keys present: architectures",
    ),
    cli(
        "llava-config-vision-tower-not-clip",
        _build("llava", config=_vision(model_type="siglip_vision_model")),
        "vision_config.model_type is 'siglip_vision_model'",
        "supports only 'clip_vision_model'",
    ),
    cli(
        "llava-config-text-model-unsupported",
        _build("llava", config=_text(model_type="gemma")),
        "text_config.model_type is 'gemma'",
        "supports ['llama', 'mistral']",
    ),
    cli(
        "llava-config-feature-strategy-unknown",
        _build("llava", config=_top(vision_feature_select_strategy="cls")),
        "vision_feature_select_strategy is 'cls'",
        "supports ['default', 'full']",
    ),
    cli(
        "llava-config-feature-layer-beyond-the-tower",
        _build("llava", config=_top(vision_feature_layer=7)),
        "vision_feature_layer 7 outside -4..3",
    ),
    cli(
        "llava-config-projector-activation-unknown",
        _build("llava", config=_top(projector_hidden_act="relu6")),
        "projector_hidden_act is 'relu6'",
        "['gelu', 'gelu_pytorch_tanh', 'quick_gelu', 'silu']",
    ),
    cli(
        "llava-config-vision-activation-unknown",
        _build("llava", config=_vision(hidden_act="gelu_new")),
        "vision_config.hidden_act is 'gelu_new'",
        "['quick_gelu', 'gelu']",
    ),
    cli(
        "llava-config-rope-dynamic",
        _build(
            "llava",
            config=_text(
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
            ),
        ),
        "rope type 'dynamic' is not supported",
        "expected one of ['default', 'linear', 'llama3']",
    ),
    cli(
        "llava-config-image-token-beyond-the-vocabulary",
        _build("llava", config=_top(image_token_index=500)),
        "image_token_index 500 is outside the 416 embeddings",
    ),
    cli(
        "llava-config-heads-not-a-multiple-of-kv-heads",
        _build("llava", config=_text(num_key_value_heads=3)),
        "4 attention heads do not divide into 3 KV heads",
    ),
    cli(
        "llava-next-config-pinpoints-not-whole-tiles",
        _build("llava_next", config=_top(image_grid_pinpoints=[[50, 100]])),
        "image_grid_pinpoints [[50, 100]] are not all multiples of the 56-pixel tile",
    ),
    cli(
        "llava-next-config-full-strategy",
        _build("llava_next", config=_top(vision_feature_select_strategy="full")),
        "vision_feature_select_strategy 'full' cannot lay out anyres tiles",
    ),
    cli(
        "llava-next-config-without-the-newline",
        _build("llava_next", config=_top(use_image_newline_parameter=False)),
        "use_image_newline_parameter is False",
    ),
    # -- build: the checkpoint's tensors --------------------------------------------------------
    cli(
        "llava-ckpt-original-repository-names",
        _build("llava", tensors=_put("model.mm_projector.0.weight", (2,))),
        "original LLaVA repository's weights (model.mm_projector.0.weight, ...)",
        "convert_llava_weights_to_hf.py",
    ),
    cli(
        "llava-ckpt-missing-projector",
        _build("llava", tensors=_pop(PROJ)),
        "1 tensors missing",
        PROJ,
    ),
    cli(
        "llava-ckpt-missing-a-tower-layer-the-features-need",
        _build("llava", tensors=_pop(TOWER_1)),
        "1 tensors missing",
        TOWER_1,
    ),
    cli(
        "llava-ckpt-unexpected-tensor",
        _build("llava", tensors=_put("extra", (1,))),
        "1 unexpected ['extra']",
    ),
    cli(
        "llava-ckpt-projector-of-the-wrong-width",
        _build("llava", tensors=_put(PROJ, (64, 65))),
        f"tensor {PROJ} has shape [64, 65]; the config implies [64, 64]",
    ),
    # -- build: options the model cannot take -----------------------------------------------------
    cli(
        "llava-build-seq-too-short-for-one-image",
        _build("llava", "--max-seq-len", "12"),
        "max-seq-len 12 cannot hold one image's 16 image tokens",
        "give at least --max-seq-len 18",
    ),
    cli(
        "llava-build-seq-beyond-positions",
        _build("llava", "--max-seq-len", "4096"),
        "max-seq-len 4096 beyond the model's 2048 positions",
    ),
    cli(
        "llava-build-shared-text-engine",
        _build("llava", "--text-engine", "shared"),
        "LLaVA has no shared text engine",
        "expected --text-engine split",
    ),
    cli(
        "llava-build-xattn-mask",
        _build("llava", "--xattn-mask", "meta"),
        "xattn-mask meta: LLaVA has no cross-attention",
        "leave --xattn-mask out",
    ),
    cli(
        "llava-build-fp8-exclude-every-layer",
        _build("llava", "--precision", "fp8", "--fp8-exclude", "text.*"),
        "--fp8-exclude text.* leaves no layer in FP8",
        "--precision fp16",
    ),
    cli(
        "llava-build-fp8-exclude-matching-nothing",
        _build("llava_next", "--precision", "fp8", "--fp8-exclude", "*cross_attn*"),
        "--fp8-exclude '*cross_attn*' matches none of the FP8-quantizable layers",
        "text.layers.0.self_attn.q_proj",
    ),
    cli(
        "llava-build-fp8-exclude-vision-without-fp8-vision",
        _build("llava", "--precision", "fp8", "--fp8-exclude", "vision.*"),
        "'vision.*'",
        "only in builds with --fp8-vision",
    ),
    cli(
        "llava-build-check-depth-full-without-the-memory",
        _patched_memory(1 << 30, "--check-depth", "full"),
        "--check-depth full needs",
    ),
    cli(
        "llava-build-no-memory-even-for-a-reduced-check",
        _patched_memory(1 << 24, "--precision", "fp16"),
        "even on a reduced copy",
    ),
    # -- plan ---------------------------------------------------------------------------------------
    cli(
        "llava-plan-seq-cannot-hold-the-images",
        lambda c: ["plan", "--model", "llava-1.5-7b", "--max-seq-len", "1000"],
        "max_seq_len 1000 cannot hold 2 image(s) of llava-1.5-7b (576 tokens each at most)",
        "expected --max-seq-len at least 1153, or fewer --max-images",
    ),
    cli(
        "llava-plan-original-repository",
        lambda c: ["plan", "--model", _build("llava", config=_original)(c)[2]],
        "original LLaVA repository's format",
        "convert_llava_weights_to_hf.py",
    ),
    # -- run ----------------------------------------------------------------------------------------
    cli(
        "llava-run-token-ids-with-too-few-image-tokens",
        _run("--token-ids", f"1,2,{IMAGE_TOKEN}", images=(SQUARE,)),
        f"--token-ids hold 1 image tokens (id {IMAGE_TOKEN}) but the 1 --image given need",
        "one run per image, in order, as the processor expands them",
    ),
    cli(
        "llava-run-token-ids-with-image-tokens-but-no-image",
        _run("--token-ids", f"{IMAGE_TOKEN},{IMAGE_TOKEN}"),
        "--token-ids hold 2 image tokens",
        "ids without images hold no image token",
    ),
    cli(
        "llava-run-more-placeholders-than-images",
        _run("--prompt", "<image> and <image>: what?", images=(SQUARE,)),
        "the prompt holds 2 <image> placeholder(s) but 1 image(s) were given",
        "give one image per <image>",
    ),
    cli(
        "llava-run-placeholder-without-an-image",
        _run("--prompt", "<image> what is it?"),
        "the prompt holds 1 <image> placeholder(s) but 0 image(s)",
    ),
    cli(
        "llava-run-too-many-images",
        _run("--prompt", "what?", images=(SQUARE, SQUARE, SQUARE)),
        "3 images were given but these artifacts were built for at most 2 per prompt",
        "rebuild with a larger max_images",
    ),
    cli(
        "llava-run-wide-image-and-long-prompt-beyond-max-seq-len",
        _run("--prompt", "what " * 470, images=(WIDE,)),
        "cannot generate: a prompt of",
        "(built for 512 in all; shorten the prompt or max_new_tokens)",
    ),
    cli(
        "llava-run-token-id-beyond-the-vocabulary",
        _run("--token-ids", "1,2,999"),
        "--token-ids hold token id(s) [999] outside the vocabulary",
        "expected ids in 0..415",
    ),
    cli(
        "llava-run-processor-of-another-model",
        _run_on_edited("processor_config.json", _top(processor_class="LlavaProcessor")),
        "processor_class LlavaProcessor does not go with the image processor for llava_next",
        "expected LlavaNextProcessor",
    ),
    cli(
        "llava-run-image-settings-unknown-key",
        _run_on_edited("preprocessor_config.json", _top(do_magic=True)),
        "unknown key(s) ['do_magic']",
    ),
    cli(
        "llava-run-image-without-processor-files",
        _without("processor_config.json"),
        "these artifacts have no processor_config.json; images cannot be read",
    ),
    # -- the Python API -----------------------------------------------------------------------------
    api(
        "llava-generate-ids-image-run-split-in-two",
        _generate_ids([[1, *[IMAGE_TOKEN] * 8, 2, *[IMAGE_TOKEN] * 8, 5]], "<image>"),
        "cannot generate: row 0 has 16 image tokens (runs of [8, 8])",
    ),
    api(
        "llava-generate-ids-images-not-from-encode",
        _generate_ids([[1, 2, 3]], "<image>", wrap=lambda images: images.pixel_values),
        "images of type ndarray (expected LlavaImages, as encode gives)",
    ),
    api(
        "llava-generate-ids-images-for-another-batch",
        _generate_ids([[1, 2], [3, 4]], "<image>"),
        "images for 1 prompts but 2 prompts",
    ),
    api(
        "llava-generate-chat-image-part-without-an-image",
        _generate(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
        ),
        "the chat messages hold 1 <image> placeholder(s) (image parts) but 0 image(s)",
    ),
    api(
        "llava-generate-prompt-not-text",
        _generate(12),
        "prompt is a int; expected a string or a list of chat messages",
    ),
    # -- validate -----------------------------------------------------------------------------------
    cli(
        "llava-validate-evalset-image-missing",
        _validate_evalset('{"prompt": "What is it?", "images": ["cat.png"]}'),
        "line 1: image file(s) not found",
        "expected image files beside prompts.jsonl",
    ),
    cli(
        "llava-validate-evalset-placeholders-and-images-differ",
        _validate_evalset(
            '{"prompt": "<image> <image> what?", "images": ["a.png"]}', images=("a.png",)
        ),
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    cli(
        "llava-validate-evalset-token-ids-without-image-tokens",
        _validate_evalset('{"token_ids": [1, 2, 3], "images": ["a.png"]}', images=("a.png",)),
        "hold 0 image tokens",
    ),
    cli(
        "llava-validate-checkpoint-of-another-model",
        lambda c: ["validate", c.world.llava.shared, "--checkpoint", c.world.llava.ckpt["llava"]],
        "has a different config from the one the artifacts were built with",
    ),
    cli(
        "llava-sensitivity-on-fp32-artifacts",
        lambda c: ["sensitivity", c.world.llava.shared],
        "needs artifacts built with --precision fp8; these are 'fp32'",
    ),
]

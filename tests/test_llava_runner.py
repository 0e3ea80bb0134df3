"""LLaVA through the generic runner (engines/runner.py), on our PyTorch graphs and on ONNX
Runtime over exported graphs: greedy tokens equal to transformers' generate, logits within
relative L2 1e-5 at every step, fp32; the input processor's refusals, one line each."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from llava_cases import (
    ARTIFACT_LIMITS,
    PAD,
    REL_L2,
    artifacts,
    built,
    hf_inputs,
    rel_l2,
)
from PIL import Image
from test_llava_reference import PINPOINT_IMAGES, generation_inputs, prompt

from mllama_export.engines.llava_preprocess import LlavaImages
from mllama_export.engines.llava_text import left_pad
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.limits import Limits
from mllama_export.graphs.llava_layout import image_tiles

pytest.importorskip("transformers")

LIMITS = Limits(**ARTIFACT_LIMITS)
STEPS = 20
BACKENDS = ["torch", "onnxruntime", "onnxruntime-iobinding"]
CASES = ["text-only", "one-image", "two-images", "padded-batch-of-3"]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def runners(kind, tmp_path_factory) -> dict[str, Runner]:
    case = built(kind, tmp_path_factory)
    folder = artifacts(kind, tmp_path_factory)
    return {
        "torch": Runner.from_model(case.ours, LIMITS),
        "onnxruntime": Runner.from_artifacts(folder),
        "onnxruntime-iobinding": Runner.from_artifacts(folder, io_binding=True),
    }


def as_images(config, image_sizes, pixels) -> LlavaImages | None:
    if not any(image_sizes):
        return None
    tiles = [[image_tiles(config, s) for s in row] for row in image_sizes]
    return LlavaImages(pixels, image_sizes, tiles)


@functools.cache
def _reference(hf, config, rows, image_sizes, pixels_bytes, shape):
    """transformers' greedy generate of exactly STEPS tokens: its end token is made one no
    logit can pick, so that it stops no row early, as the runner's empty stop set does."""
    pixels = np.frombuffer(pixels_bytes, np.float32).reshape(shape).copy()
    batch = left_pad([list(r) for r in rows], PAD)
    inputs = hf_inputs(config, batch, pixels, [list(r) for r in image_sizes])
    with torch.no_grad():
        out = hf.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD,
            eos_token_id=config.text.vocab_size, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[:, batch["input_ids"].shape[1] :].tolist(), torch.stack(out.logits).numpy()


def reference(case, rows, image_sizes, pixels):
    key = tuple(map(tuple, rows)), tuple(map(tuple, image_sizes))
    return _reference(case.hf, case.config, *key, pixels.tobytes(), pixels.shape)


def assert_generates_as_transformers(runner, case, rows, image_sizes, pixels):
    images = as_images(case.config, image_sizes, pixels)
    ours = runner.generate_ids(rows, images, STEPS, stop_tokens=set(), keep_logits=True)
    ref_tokens, ref_logits = reference(case, rows, image_sizes, pixels)
    assert ours.token_ids == ref_tokens
    steps = [ours.prefill_logits[:, -1], *ours.step_logits]
    assert len(steps) == STEPS
    for step, logits in enumerate(steps):
        for b in range(len(rows)):
            err = rel_l2(logits[b], ref_logits[step, b])
            assert err < REL_L2, f"step {step} row {b}: relative L2 {err:.2e}"
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_equals_transformers(runners, kind, backend, name, tmp_path_factory):
    case = built(kind, tmp_path_factory)
    rows, image_sizes, pixels = generation_inputs(case, name)
    ours = assert_generates_as_transformers(runners[backend], case, rows, image_sizes, pixels)
    assert ours.cache_bytes_per_step > 0
    if any(image_sizes):
        assert "vision_s" in ours.timings


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_next_images_of_every_pinpoint_in_one_batch(backend, tmp_path_factory):
    """Portrait, landscape, square, tiny and very wide: each row's grid and unpadding."""
    case = built("llava_next", tmp_path_factory)
    runner = (
        Runner.from_model(case.ours, LIMITS)
        if backend == "torch"
        else Runner.from_artifacts(artifacts("llava_next", tmp_path_factory))
    )
    image_sizes = [[s] for s in PINPOINT_IMAGES]
    rows = [prompt(case, s, [1 + i, 2], seed=60 + i) for i, s in enumerate(image_sizes)]
    rng = np.random.default_rng(61)
    v = case.config.vision
    n = sum(image_tiles(case.config, s) for row in image_sizes for s in row)
    pixels = rng.standard_normal((n, 3, v.image_size, v.image_size)).astype(np.float32)
    assert_generates_as_transformers(runner, case, rows, image_sizes, pixels)


# -- refusals, one line each -------------------------------------------------------------------


def one_line(match: str):
    return pytest.raises(MllamaExportError, match=match)


def test_token_ids_whose_image_tokens_do_not_match_the_images(runners, kind, tmp_path_factory):
    case = built(kind, tmp_path_factory)
    runner = runners["onnxruntime"]
    rows, image_sizes, pixels = generation_inputs(case, "one-image")
    images = as_images(case.config, image_sizes, pixels)
    short = [t for i, t in enumerate(rows[0]) if i != rows[0].index(case.config.image_token_id)]
    with one_line(r"^cannot generate: row 0 has \d+ image tokens .* images need \d+") as err:
        runner.generate_ids([short], images, 2)
    with one_line("row 0 has .* image tokens"):
        runner.generate_ids(rows, None, 2)  # image tokens, no image
    with one_line("images for 1 prompts but 2 prompts"):
        runner.generate_ids([rows[0], rows[0]], images, 2)
    assert "\n" not in str(err.value)


def test_encode_refuses_what_the_processor_would_misalign(runners, tmp_path_factory):
    runner = runners["onnxruntime"]
    image = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    ids = [5, 6, runner.config.image_token_id, 7]
    with one_line(r"^--token-ids hold 1 image tokens \(id 300\) but the 1 --image given need \d+"):
        runner.inputs.encode(
            images=[image], token_ids=ids, ids_name="--token-ids", images_name="--image"
        )
    with one_line("3 images were given but these artifacts were built for at most 2"):
        runner.inputs.encode(images=[image] * 3, token_ids=ids)
    with one_line(r"the token ids hold token id\(s\) \[9999\] outside the vocabulary"):
        runner.inputs.encode(token_ids=[1, 9999])
    with one_line("no tokenizer.json; pass token ids"):
        runner.encode("describe <image>", [image])
    with one_line("prefill_chunk 4: LLaVA prefills the whole prompt in one call"):
        runner.generate_ids([[1, 2, 3]], None, 2, prefill_chunk=4)


def test_requests_beyond_the_limits(runners):
    runner = runners["torch"]
    with one_line(r"a batch of 6 prompts \(built for 1..5\)"):
        runner.generate_ids([[1, 2]] * 6, None, 2)
    with one_line("a prompt of 250 tokens plus 10 new tokens"):
        runner.generate_ids([[3] * 250], None, 10)
    with one_line("expected a list of token-id lists"):
        runner.generate_ids("1,2,3", None, 2)


# -- the evaluation set, through the gate's trace ---------------------------------------------


def test_the_evalset_runs_alike_on_every_backend(runners, kind):
    from mllama_export.engines import llava_evalset as evalset
    from mllama_export.validate.gate import trace_runner

    cases = evalset.build_evalset(runners["torch"].config, LIMITS, steps=3)
    names = [c.name for c in cases]
    assert names[:4] == CASES
    assert [c.num_images for c in cases[:4]] == [0, 1, 2, 3]
    assert len(cases[3].prompts) == 3 and len({len(p) for p in cases[3].prompts}) == 3
    pins = runners["torch"].config.image_grid_pinpoints
    assert len(names) == 4 + len(pins)  # LLaVA-NeXT: one image per pinpoint
    for case in cases:
        ours, ref = (trace_runner(runners[b], case, 3) for b in ("onnxruntime", "torch"))
        assert set(ours.stages) == set(ref.stages) == set(evalset.case_stages(case))
        for name in ours.stages:
            assert rel_l2(ours.stages[name], ref.stages[name]) < REL_L2, (case.name, name)
        assert rel_l2(ours.prefill, ref.prefill) < REL_L2, case.name
        np.testing.assert_array_equal(ours.tokens, ref.tokens)


def test_the_evalset_fits_the_limits_or_says_why(runners):
    from mllama_export.engines.llava_evalset import build_evalset

    config = runners["torch"].config
    small = Limits(max_batch=1, max_seq_len=96, max_images=1)
    cases = build_evalset(config, small, steps=3)
    assert all(len(c.prompts) == 1 and len(max(c.prompts, key=len)) <= 92 for c in cases)
    assert all(c.num_images <= 1 for c in cases) and any(c.num_images for c in cases)
    with one_line("the artifacts take images but were built for 12 tokens in all"):
        build_evalset(config, Limits(max_batch=2, max_seq_len=12, max_images=1), steps=3)


def test_a_users_evalset(runners, kind, tmp_path, tmp_path_factory):
    from mllama_export.engines.llava_evalset import load_evalset

    case = built(kind, tmp_path_factory)
    Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(tmp_path / "a.png")
    ids = prompt(case, [(40, 70)], [2, 3], seed=70)
    lines = [
        json.dumps({"token_ids": ids, "images": ["a.png"], "name": "one"}),
        "# a comment",
        json.dumps({"token_ids": ids[:3]}),
    ]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines))
    folder = artifacts(kind, tmp_path_factory)
    cases = load_evalset(tmp_path, folder)
    assert [c.name for c in cases] == ["one", "line-3"] and cases[0].num_images == 1
    runners["onnxruntime"].generate_ids(cases[0].prompts, cases[0].images, 2)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "hi"}))
    with one_line("prompts.jsonl line 1: these artifacts have no tokenizer.json"):
        load_evalset(tmp_path, folder)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"token_ids": ids}))
    with one_line(r'line 1: "token_ids" hold \d+ image tokens .* but the 0 image\(s\) given'):
        load_evalset(tmp_path, folder)


# -- `mllama-export run` ------------------------------------------------------------------------


def test_the_run_command(runners, kind, tmp_path, tmp_path_factory):
    from click.testing import CliRunner

    from mllama_export.cli import main

    case = built(kind, tmp_path_factory)
    folder = artifacts(kind, tmp_path_factory)
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 30, 3), np.uint8)).save(
        tmp_path / "a.png"
    )
    ids = prompt(case, [(50, 30)], [2, 3], seed=71)
    args = ["run", str(folder), "--token-ids", ",".join(map(str, ids)), "--image"]
    out = CliRunner().invoke(
        main, [*args, str(tmp_path / "a.png"), "--max-new-tokens", "6", "--json"]
    )
    assert out.exit_code == 0, out.output
    runner = runners["onnxruntime"]
    _, images = runner.inputs.encode(images=[tmp_path / "a.png"], token_ids=ids)
    expected = runner.generate_ids([ids], images, 6).token_ids[0]
    assert json.loads(out.stdout)["token_ids"] == expected
    bad = CliRunner().invoke(main, ["run", str(folder), "--token-ids", ",".join(map(str, ids))])
    assert bad.exit_code == 2
    errors = [line for line in bad.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "--token-ids hold" in errors[0], bad.output
    assert bad.output.rstrip().endswith("hold no image token)")


# -- prompts and chat, as transformers' processor makes them ------------------------------------


@pytest.mark.parametrize("name", ["llava-tiny", "llava-next-tiny"])
def test_prompts_and_chat_give_the_processors_ids_and_pixels(name, tmp_path):
    import transformers

    from mllama_export.engines.backend import TorchBackend
    from mllama_export.engines.llava_preprocess import LlavaProcessorConfig
    from mllama_export.engines.text import Tokenizer
    from mllama_export.graphs.checkpoint import load_model
    from mllama_export.graphs.llava_model import GRAPH_MODULES
    from mllama_export.graphs.llava_presets import llava_preset
    from mllama_export.graphs.synthetic import write_checkpoint

    folder = write_checkpoint(llava_preset(name), tmp_path / "ckpt", seed=4)
    model = load_model(folder)
    backends = {g: TorchBackend(cls(model)) for g, cls in GRAPH_MODULES.items()}
    runner = Runner(
        model.config, backends, LIMITS, tokenizer=Tokenizer.from_dir(folder),
        image_config=LlavaProcessorConfig.from_dir(folder),
    )  # fmt: skip
    proc = transformers.AutoProcessor.from_pretrained(folder)
    rng = np.random.default_rng(5)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in [(37, 91), (120, 50)]
    ]
    chat = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}],
        }
    ]
    plain = "USER: <image>\nWhat is this? <image>\nASSISTANT:"
    for ours_prompt, text in (
        (plain, plain),
        (chat, proc.apply_chat_template(chat, add_generation_prompt=True)),
    ):
        ref = proc(images=images, text=[text], return_tensors="np")
        ids, batch = runner.encode(ours_prompt, images)
        assert ids == ref["input_ids"][0].tolist()
        ref_pixels = ref["pixel_values"]
        if model.config.is_next:  # [images, most tiles, ...], zero-padded: the real tiles only
            ref_pixels = np.concatenate(
                [p[:n] for p, n in zip(ref_pixels, batch.num_tiles[0], strict=True)]
            )
        np.testing.assert_allclose(batch.pixel_values, ref_pixels, atol=1e-5, rtol=0)
    # text in, text out: the same tokens as the ids path, streamed or not
    done = runner.generate(chat, images, max_new_tokens=6)
    stop = runner.tokenizer.eos_token_ids | set(model.config.eos_token_ids)
    assert done.token_ids == runner.generate_ids([ids], batch, 6, stop_tokens=stop).token_ids[0]
    assert "".join(runner.stream(chat, images, max_new_tokens=6)) == done.text
    assert (
        runner.encode("Describe.", images[:1])[0]
        == proc(images=images[:1], text=["<image>\nDescribe."], return_tensors="np")["input_ids"][
            0
        ].tolist()
    )
    with one_line(r"the prompt holds 1 <image> placeholder\(s\) but 2 image\(s\) were given"):
        runner.encode("<image> one", images)

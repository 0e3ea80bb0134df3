"""From image files and a prompt to text, held to transformers' MllamaProcessor + generate.

The reference is the usual user flow: `processor(images=..., text=prompt)` for a plain prompt,
or `processor.apply_chat_template(messages, add_generation_prompt=True)` followed by
`processor(images=..., text=rendered, add_special_tokens=False)` for chat messages, then
greedy `model.generate`. Ours is `mllama-export run` and `Runner.generate/stream` on the
tiny ONNX artifacts (hf cross-attention mask semantics).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from imagefiles import bomb_png, png_bytes
from PIL import Image

from mllama_export.cli import main
from mllama_export.engines.inputs import prompt_feed
from mllama_export.engines.runner import Runner
from mllama_export.errors import MllamaExportError

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 12
IMG = "<|image|>"
BOS = "<|begin_of_text|>"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(ort_artifacts):
    """The reference processor, built from the artifact folder's own tokenizer and config.

    The folder has no processor_config.json / chat_template.jinja, so from_pretrained would
    give a processor without a chat template; it is assembled from its parts instead.
    """
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(ort_artifacts)
    image_processor = MllamaImageProcessorPil.from_pretrained(ort_artifacts)
    return transformers.MllamaProcessor(
        image_processor, tokenizer, chat_template=tokenizer.chat_template
    )


@pytest.fixture(scope="module")
def runner(ort_artifacts) -> Runner:
    return Runner.from_artifacts(ort_artifacts)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """Three small PNGs with different canvases (1, 2 and 4 tiles of 56 px)."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(40, 30), (120, 50), (90, 100)]):
        path = folder / f"img{i}.png"
        Image.effect_noise(size, 50 + 20 * i).convert("RGB").save(path)
        paths.append(path)
    return paths


def _pil(paths):
    return [Image.open(p).convert("RGB") for p in paths]


def _chat(prompt: str, n_images: int) -> list[dict]:
    # What `mllama-export run --chat` builds: one user turn, the images first.
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _reference_inputs(processor, prompt, paths):
    images = _pil(paths) or None
    if isinstance(prompt, str):
        return processor(images=images, text=prompt, return_tensors="pt")
    text = processor.apply_chat_template(prompt, add_generation_prompt=True)
    return processor(images=images, text=text, add_special_tokens=False, return_tensors="pt")


def _reference_tokens(tiny_hf, processor, prompt, paths) -> list[int]:
    inputs = _reference_inputs(processor, prompt, paths)
    out = tiny_hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# --- prompt -> ids, as MllamaProcessor makes them ---------------------------------------------

# (our prompt, number of images, the text handed to the reference processor)
PLAIN = {
    "text-only": ("Describe the image in one sentence.", 0, None),
    "text-only-explicit-bos": (BOS + "The quick brown fox", 0, None),
    "implicit-1": ("Describe the image.", 1, IMG + "Describe the image."),
    "implicit-2": ("Compare them.", 2, IMG * 2 + "Compare them."),
    "leading-1": (IMG + "What color is the car?", 1, None),
    "middle-1": ("Look at this: " + IMG + " what is it?", 1, None),
    "leading-and-middle-2": (IMG + "First, then " + IMG + " second.", 2, None),
    "consecutive-2-middle": ("Two cats " + IMG * 2 + " on the sofa", 2, None),
    "bos-then-image": (BOS + IMG + "hi", 1, None),
    "model-card-base-format": (IMG + BOS + "If I had to write a haiku", 1, None),
}

CHATS = {
    "text": [{"role": "user", "content": "Hello there"}],
    "system-and-text": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "What is ONNX?"}]},
    ],
    "one-image": _chat("What is in the picture?", 1),
    "two-images-interleaved": [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "This one, and "},
                {"type": "image"},
                {"type": "text", "text": "that one: which is larger?"},
            ],
        }
    ],
    "multi-turn": [
        *_chat("Describe the image.", 1),
        {"role": "assistant", "content": [{"type": "text", "text": "A brown dog."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    ],
}


def _assert_same_inputs(runner, ours_ids, ours_images, reference):
    assert ours_ids == reference["input_ids"][0].tolist()
    if ours_images is None:
        assert "pixel_values" not in reference
        return
    np.testing.assert_allclose(
        ours_images.pixel_values, reference["pixel_values"].numpy(), rtol=0, atol=1e-5
    )
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        np.testing.assert_array_equal(getattr(ours_images, key), reference[key].numpy())
    feed = prompt_feed(runner.config, [ours_ids], ours_images)
    np.testing.assert_array_equal(
        feed["cross_attention_mask"], reference["cross_attention_mask"].numpy()
    )


@pytest.mark.parametrize("case", PLAIN)
def test_plain_prompt_ids_equal_the_processor(runner, processor, image_files, case):
    prompt, n, reference_text = PLAIN[case]
    paths = image_files[:n]
    ids, images = runner.encode(prompt, paths)
    reference = _reference_inputs(processor, reference_text or prompt, paths)
    _assert_same_inputs(runner, ids, images, reference)


def test_the_processor_quirk_of_two_bos_tokens_is_kept(runner):
    tok = runner.tokenizer
    bos, img = tok.token_id(BOS), tok.image_token_id
    hi = tok.encode("hi", add_bos=False)
    assert runner.encode("hi")[0] == [bos, bos, *hi]
    assert runner.encode(IMG + "hi", [Image.new("RGB", (8, 8))])[0] == [bos, img, bos, *hi]


@pytest.mark.parametrize("case", CHATS)
def test_chat_ids_equal_apply_chat_template_then_the_processor(
    runner, processor, image_files, case
):
    messages = CHATS[case]
    n = sum(
        part.get("type") == "image"
        for m in messages
        if isinstance(m["content"], list)
        for part in m["content"]
    )
    ids, images = runner.encode(messages, image_files[:n])
    reference = _reference_inputs(processor, messages, image_files[:n])
    _assert_same_inputs(runner, ids, images, reference)
    assert ids.count(runner.tokenizer.token_id(BOS)) == 1


# --- end to end: the command line and the Python API against processor + generate -------------

E2E = {
    "plain-1": ("Describe the image.", 1, False),
    "plain-explicit-2": ("Compare " + IMG + " with " + IMG + " please.", 2, False),
    "chat-1": ("What is in the picture?", 1, True),
    "chat-2": ("Which is larger?", 2, True),
    "text-only": ("The quick brown fox", 0, False),
}


def _run_json(ort_artifacts, prompt, paths, chat):
    args = ["run", ort_artifacts, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS, "--json"]
    for path in paths:
        args += ["--image", path]
    result = invoke(*args, *(["--chat"] if chat else []))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("case", E2E)
def test_run_gives_the_tokens_of_processor_and_generate(
    ort_artifacts, runner, processor, tiny_hf, image_files, case
):
    prompt, n, chat = E2E[case]
    paths = image_files[:n]
    reference_prompt = (
        _chat(prompt, n) if chat else (prompt if IMG in prompt or not n else IMG * n + prompt)
    )
    expected = _reference_tokens(tiny_hf, processor, reference_prompt, paths)
    out = _run_json(ort_artifacts, prompt, paths, chat)
    assert out["token_ids"] == expected
    assert out["text"] == runner.tokenizer.decode(expected)
    # The Python API gives the same, and its stream joins to the same text.
    api_prompt = _chat(prompt, n) if chat else prompt
    gen = runner.generate(api_prompt, paths, max_new_tokens=NEW_TOKENS)
    assert gen.token_ids == expected and gen.text == out["text"]
    pieces = list(runner.stream(api_prompt, paths, max_new_tokens=NEW_TOKENS))
    assert "".join(pieces) == gen.text
    for piece in pieces:
        assert piece and ("\ufffd" not in piece or "\ufffd" in gen.text)


def test_run_streams_the_same_text_to_the_terminal(ort_artifacts, runner, image_files):
    prompt, paths = "What is in the picture?", image_files[:2]
    args = ["run", ort_artifacts, "--prompt", prompt, "--chat", "--max-new-tokens", NEW_TOKENS]
    result = invoke(*args, "--image", paths[0], "--image", paths[1])
    assert result.exit_code == 0, result.output
    from mllama_export.engines.text import printable

    pieces = runner.stream(_chat(prompt, 2), paths, NEW_TOKENS, errors="backslashreplace")
    expected = printable("".join(pieces))
    # stdout: the answer alone, whole characters, nothing unprintable; stderr: its label
    assert result.stdout == expected + "\n"
    assert "\ufffd" not in result.stdout and all(c.isprintable() for c in result.stdout[:-1])
    assert "answer: " in result.stderr and "token(s) in" in result.stderr


def test_stream_never_splits_a_multibyte_character(runner, monkeypatch):
    text = "Crème brûlée — 日本語のテキスト 😀👍🏽 👨‍👩‍👧 🇫🇷"
    ids = runner.tokenizer.encode(text, add_bos=False)
    # The byte-level tokens cut characters: some single tokens decode to U+FFFD on their own.
    assert any("\ufffd" in runner.tokenizer.decode([i]) for i in ids)

    def fake_steps(prompts, images, max_new_tokens, sampling, stop, result, **kwargs):
        for token in ids[:max_new_tokens]:
            result.token_ids[0].append(token)
            yield np.array([token])

    monkeypatch.setattr(runner, "iter_steps", fake_steps)
    pieces = list(runner.stream("Say something.", max_new_tokens=len(ids)))
    assert (
        "".join(pieces) == text == runner.generate("Say something.", max_new_tokens=len(ids)).text
    )
    assert len(pieces) > 1 and not any("\ufffd" in p for p in pieces)


# --- bad images and bad image counts: one clear error each -------------------------------------


BAD_IMAGES = {
    "truncated": (lambda: png_bytes()[:600], "truncated"),
    "not-an-image": (lambda: b"this is text, not a picture\n", "not in a recognised image format"),
    "empty": (lambda: b"", "empty (0 bytes)"),
    "decompression-bomb": (lambda: bomb_png(30000), "decompression bomb"),
    "missing": (None, "no such file"),
}


@pytest.fixture(params=BAD_IMAGES)
def bad_image(request, tmp_path) -> tuple[Path, str]:
    make, fragment = BAD_IMAGES[request.param]
    path = tmp_path / f"{request.param}.png"
    if make is not None:
        path.write_bytes(make())
    if request.param == "decompression-bomb":
        assert path.stat().st_size < 100
    return path, fragment


@pytest.mark.parametrize("chat", [False, True])
def test_bad_image_on_the_command_line_is_one_line_and_exit_2(
    ort_artifacts, image_files, bad_image, chat
):
    path, fragment = bad_image
    args = ["run", ort_artifacts, "--prompt", "What is it?", "--image", image_files[0]]
    result = invoke(*args, "--image", path, *(["--chat"] if chat else []))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cannot read image")
    assert str(path) in errors[0] and fragment in errors[0] and result.stdout == ""


def test_bad_image_through_the_python_api(runner, image_files, bad_image):
    path, fragment = bad_image
    for call in (runner.generate, lambda *a: list(runner.stream(*a))):
        with pytest.raises(MllamaExportError) as info:
            call(IMG + "a " + IMG + " b", [image_files[0], path])
        assert str(path) in str(info.value) and fragment in str(info.value)


COUNT_ERRORS = {
    "more-tokens-than-images": (
        IMG * 2 + "hi",
        1,
        "holds 2 <|image|> tokens but 1 image was given",
    ),
    "tokens-without-images": (IMG + "hi", 0, "holds 1 <|image|> token but 0 images were given"),
    "fewer-tokens-than-images": (IMG + "hi", 2, "holds 1 <|image|> token but 2 images were given"),
    "more-images-than-max-images": (
        "hi",
        3,
        "3 images were given but these artifacts were built for at most 2",
    ),
}


@pytest.mark.parametrize("case", COUNT_ERRORS)
def test_image_count_errors(ort_artifacts, runner, image_files, case):
    prompt, n, fragment = COUNT_ERRORS[case]
    with pytest.raises(MllamaExportError, match=fragment.replace("|", r"\|")):
        runner.generate(prompt, image_files[:n], max_new_tokens=2)
    args = ["run", ort_artifacts, "--prompt", prompt, "--max-new-tokens", 2]
    for path in image_files[:n]:
        args += ["--image", path]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_chat_messages_and_images_must_agree(ort_artifacts, runner, image_files):
    with pytest.raises(MllamaExportError, match="the chat messages hold 1 <\\|image\\|> token"):
        runner.encode(_chat("Describe it.", 1), image_files[:2])
    # A literal <|image|> in a --chat prompt is one more image token than images given.
    args = ["run", ort_artifacts, "--chat", "--prompt", IMG + "hi", "--image", image_files[0]]
    result = invoke(*args)
    assert result.exit_code == 2 and "hold 2 <|image|> tokens" in result.output


def test_run_chat_needs_a_prompt(ort_artifacts):
    result = invoke("run", ort_artifacts, "--token-ids", "500,20", "--chat")
    assert result.exit_code == 2 and "--chat needs --prompt" in result.output


def test_run_help_explains_images_prompt_chat_and_streaming():
    result = invoke("run", "--help")
    assert result.exit_code == 0
    for fragment in ("<|image|>", "--chat", "chat template", "streamed", "max_images", "--json"):
        assert fragment in result.output
    for param in main.commands["run"].params:
        if param.param_type_name == "option":
            assert param.help and param.opts[0] in result.output

"""engines/text.py (tokenizer, chat template) and the cross-attention mask (engines/inputs.py)
against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mllama_export.engines.inputs import cross_attention_mask_from_ids
from mllama_export.engines.text import (
    StreamDecoder,
    Tokenizer,
)
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.synth_files import SPECIAL_TOKENS, write_synthetic_tokenizer

transformers = pytest.importorskip("transformers")
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

IMG, BOS, PAD = 512, 500, 504
TEXTS = [
    "Describe the image in one sentence.",
    "Crème brûlée, naïve café — São Paulo, Zürich!",
    "日本語のテキストと中文文本",
    "Emoji: 😀👍🏽 and a family 👨‍👩‍👧 🇫🇷",
    "mixed: the dog 🐕 saw 猫 at 12:30\n\n  indented\ttab",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    write_synthetic_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(tok_dir)


# --- synthetic tokenizer -------------------------------------------------------------------


@pytest.mark.parametrize("s", TEXTS)
def test_round_trip_and_single_bos(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert all(i < 500 for i in ids[1:])  # plain text only uses regular BPE ids
    assert tok.decode(ids) == s
    assert tok.encode(s, add_bos=False) == ids[1:]


def test_special_tokens_at_documented_ids(tok: Tokenizer) -> None:
    expected = {t: 500 + i for i, t in enumerate(SPECIAL_TOKENS)} | {"<|image|>": 512}
    assert expected["<|finetune_right_pad_id|>"] == 504 and expected["<|eot_id|>"] == 505
    for token, token_id in expected.items():
        assert tok.token_id(token) == token_id
        assert tok.encode(token, add_bos=False) == [token_id]
    assert tok.image_token_id == IMG and tok.pad_token_id == PAD and tok.eos_token_id == 505
    assert tok.eos_token_ids == {501, 505, 506}
    assert tok.backend.get_vocab_size(with_added_tokens=False) == 500


def test_bos_not_added_twice(tok: Tokenizer) -> None:
    ids = tok.encode("<|begin_of_text|>hello")
    assert ids[:1] == [BOS] and ids.count(BOS) == 1


def test_written_files_are_deterministic(tok_dir: Path, tmp_path: Path) -> None:
    write_synthetic_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes()


def test_configurable_image_token_id(tmp_path: Path) -> None:
    write_synthetic_tokenizer(tmp_path, image_token_id=520)
    ours = Tokenizer.from_dir(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.image_token_id == 520 == theirs.convert_tokens_to_ids("<|image|>")
    assert ours.encode("<|image|>hi") == theirs("<|image|>hi")["input_ids"]


def test_bad_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(MllamaExportError, match="vocab_size"):
        write_synthetic_tokenizer(tmp_path, vocab_size=200)
    with pytest.raises(MllamaExportError, match="BPE tokens"):
        write_synthetic_tokenizer(tmp_path, vocab_size=100_000)


# --- against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("s", [*TEXTS, "<|image|>What is this?", "a<|image|>b<|eot_id|>"])
def test_encode_decode_match_transformers(tok: Tokenizer, hf, s: str) -> None:
    ids = tok.encode(s)
    assert ids == hf(s)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, False) == hf.decode(ids, skip_special_tokens=False)


def _user(*parts: str | None) -> dict:
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


CHATS = {
    "no_image_string": [{"role": "user", "content": "Hello there!"}],
    "no_image_system": [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    "one_image": [_user(None, "Describe the image in one sentence.")],
    "two_images": [_user(None, "Compare", None, "these two pictures, 好吗? 😀")],
    "multi_turn": [
        _user(None, "What is in this picture?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A dog on a sofa."}]},
        _user("And what color is it?"),
        {"role": "assistant", "content": "Brown.", "tool_calls": None},
        _user(None, "And this one?"),
    ],
}


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("kwargs", [{}, {"date_string": "26 Jul 2024"}])
def test_chat_template_matches_transformers(tok: Tokenizer, hf, name: str, kwargs: dict) -> None:
    messages = CHATS[name]
    for gen in (True, False):
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
        theirs = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen, **kwargs
        )
        assert ours == theirs
    assert ours.startswith("<|begin_of_text|>") and ours.count("<|begin_of_text|>") == 1
    ids = hf.apply_chat_template(messages, add_generation_prompt=False, return_dict=False, **kwargs)
    assert tok.encode(ours) == list(ids)
    assert tok.decode(tok.encode(ours), skip_special_tokens=False) == ours


def test_template_errors_are_user_errors(tok: Tokenizer, tok_dir: Path, tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Hi"}, _user(None, "What?")]
    with pytest.raises(MllamaExportError, match="incompatible with system messages"):
        tok.apply_chat_template(messages)
    with pytest.raises(MllamaExportError, match="empty conversation"):
        tok.apply_chat_template([])
    broken = Tokenizer(tok.backend, tok.config, "{% for m in messages %}{{ m.content }")
    with pytest.raises(MllamaExportError, match="does not compile"):
        broken.apply_chat_template([_user("x")])
    with pytest.raises(MllamaExportError, match="no chat_template"):
        Tokenizer(tok.backend, {}, None).apply_chat_template([_user("x")])


def test_load_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MllamaExportError, match="No tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", "utf-8")
    with pytest.raises(MllamaExportError, match="not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}', "utf-8")
    with pytest.raises(MllamaExportError, match="not a valid tokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1,", "utf-8")
    with pytest.raises(MllamaExportError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_from_jinja_file(tok_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tok_dir / "tokenizer_config.json").read_text("utf-8"))
    template = config.pop("chat_template")
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    (tmp_path / "chat_template.jinja").write_text(template, "utf-8")
    assert Tokenizer.from_dir(tmp_path).chat_template == template


# --- cross-attention mask ------------------------------------------------------------------


def _reference(ids: list[list[int]], tiles: list[list[int]], max_tiles: int) -> np.ndarray:
    sparse = [get_cross_attention_token_mask(row, IMG) for row in ids]
    length = max(len(row) for row in ids)
    return convert_sparse_cross_attention_mask_to_dense(sparse, tiles, max_tiles, length)


MASK_CASES = {
    "no_image": ([[BOS, 1, 2, 3]], [[]]),
    "one_image": ([[BOS, IMG, 1, 2, 3]], [[4]]),
    "image_first": ([[IMG, BOS, 1, 2]], [[3]]),
    "two_images_apart": ([[BOS, IMG, 1, 2, IMG, 3, 4]], [[2, 3]]),
    "consecutive": ([[BOS, IMG, IMG, 1, 2]], [[1, 4]]),
    "middle_and_run": ([[BOS, 1, IMG, IMG, 2, IMG, 3, IMG]], [[4, 2, 1, 3]]),
    "left_padded": ([[PAD, PAD, BOS, IMG, 1, 2], [BOS, IMG, 1, IMG, 2, 3]], [[4], [2, 3]]),
    "right_padded": ([[BOS, IMG, 1, 2, PAD, PAD], [BOS, IMG, IMG, 1, 2, 3]], [[4], [2, 3]]),
    "padded_without_images": ([[PAD, PAD, BOS, 1], [BOS, IMG, 1, 2]], [[], [4]]),
}


@pytest.mark.parametrize("name", sorted(MASK_CASES))
def test_cross_attention_mask_matches_transformers(name: str) -> None:
    ids, tiles = MASK_CASES[name]
    ours = cross_attention_mask_from_ids(ids, tiles, IMG, max_num_tiles=4)
    expected = _reference(ids, tiles, 4)
    assert ours.dtype == np.int64 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def test_cross_attention_mask_from_chat(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template(CHATS["multi_turn"])
    ids = [tok.encode(prompt)]
    ours = cross_attention_mask_from_ids(ids, [[4, 1]], tok.image_token_id, 4)
    np.testing.assert_array_equal(ours, _reference(ids, [[4, 1]], 4))
    assert ours[0, : ids[0].index(IMG)].sum() == 0  # rows before the first image see nothing


@pytest.mark.parametrize(
    ("ids", "tiles", "match"),
    [
        ([[BOS, IMG, 1]], [[4, 4]], "1 image tokens but 2 images"),
        ([[BOS, IMG, IMG, 1]], [[4]], "2 image tokens but 1 images"),
        ([[BOS, 1]], [[4]], "0 image tokens but 1 images"),
        ([[BOS, IMG, 1]], [[5]], "tile counts"),
        ([[BOS, IMG], [BOS]], [[1], []], "already padded"),
        ([[BOS, IMG]], [[1], [1]], "num_tiles rows"),
    ],
)
def test_cross_attention_mask_errors(ids: list, tiles: list, match: str) -> None:
    with pytest.raises(MllamaExportError, match=match):
        cross_attention_mask_from_ids(ids, tiles, IMG, max_num_tiles=4)


# --- streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("s", TEXTS[2:5])
def test_stream_decoder_holds_back_partial_characters(tok: Tokenizer, s: str) -> None:
    ids = tok.encode(s) + [tok.token_id("<|eot_id|>")]
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == tok.decode(ids) == s
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[1:-2]  # some character spanned several tokens and was held back
    assert list(StreamDecoder(tok).stream(ids)) == [p for p in pieces if p]


def test_stream_decoder_keeps_special_tokens_when_asked(tok: Tokenizer) -> None:
    ids = tok.encode("<|image|>猫😀")
    pieces = list(tok.stream_decoder(skip_special_tokens=False).stream(ids))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)


def test_stream_decoder_flushes_truncated_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀", add_bos=False)[:-1]  # drop the emoji's last byte
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == "ok "
    assert decoder.finish() == tok.decode(ids)[3:] and tok.decode(ids).endswith("\ufffd")


def test_any_id_sequence_streams_to_exactly_what_decode_gives(tok: Tokenizer) -> None:
    """Random ids (specials and ids past the vocabulary included) form invalid UTF-8 all
    the time: the byte-level stream joins to decode()'s text, U+FFFD where it puts one."""
    rng = np.random.default_rng(0)
    size = tok.backend.get_vocab_size()
    for _ in range(200):
        ids = rng.integers(0, size + 3, rng.integers(1, 40)).tolist()
        for skip in (True, False):
            joined = "".join(tok.stream_decoder(skip).stream(ids))
            assert joined == tok.decode(ids, skip_special_tokens=skip)


def test_bytes_that_form_no_character_can_be_shown_as_escapes(tok: Tokenizer) -> None:
    from mllama_export.engines.text import printable

    ids = tok.encode("ok 😀", add_bos=False)[:-1] + tok.encode("\x18 fine", add_bos=False)
    shown = printable("".join(tok.stream_decoder(errors="backslashreplace").stream(ids)))
    assert shown.startswith("ok \\xf0\\x9f") and shown.endswith("\\x18 fine")
    assert "\ufffd" not in shown and shown.isprintable()
    assert printable("a\tb\nc\u200bd") == "a\tb\nc\\u200bd"

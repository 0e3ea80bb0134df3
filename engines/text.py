"""Text side of the runner's input pipeline: tokenizer and chat template.

Nothing here imports transformers: the runner must work on machines that only have the
`tokenizers` and `jinja2` wheels. The tests check every function against transformers.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
import tokenizers
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders

from mllama_export.errors import MllamaExportError
from mllama_export.graphs.synth_files import IMAGE_TOKEN

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages (with image parts)

# Tokens that end an assistant turn; Llama 3.2's generation_config stops on all three.
_STOP_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
# The special-token attributes transformers hands to the chat template.
_TEMPLATE_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MllamaExportError(f"{path} is not valid JSON ({e}); expected a JSON file.") from e


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores a special token either as a string or as a serialized AddedToken.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _load_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template


class _GenerationTag(jinja2.ext.Extension):
    # transformers' templates may wrap assistant turns in {% generation %}; it renders the body.
    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    # Same guard as transformers: no underscore attributes, so templates can't reach internals.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    # Like transformers: templates may build dicts but never hold the dict type itself.
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; transformers' version (copied here) does not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the same sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise MllamaExportError(f"The chat template does not compile: {e}") from e


def _plain(value: Any) -> Any:
    # A deep copy in plain JSON types, as transformers gives the template (drops None keys too).
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Tokenizer:
    """A Hugging Face checkpoint's tokenizer, without transformers."""

    def __init__(
        self, backend: tokenizers.Tokenizer, config: Mapping[str, Any], chat_template: str | None
    ) -> None:
        self.backend = backend
        self.config = dict(config)
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json (and special_tokens_map.json) from `path`."""
        folder = Path(path)
        tokenizer_json = folder / "tokenizer.json"
        if not tokenizer_json.is_file():
            present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "nothing"
            raise MllamaExportError(
                f"No tokenizer.json in {folder}; expected a Hugging Face checkpoint folder. "
                f"It contains: {present}."
            )
        _read_json(tokenizer_json)  # a clear message for corrupt JSON before tokenizers' own
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception
            raise MllamaExportError(
                f"{tokenizer_json} is not a valid tokenizer: {e}; expected the tokenizer.json "
                "of a Hugging Face (tokenizers) tokenizer"
            ) from e
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                config.update(_read_json(folder / name))
        return cls(backend, config, _load_chat_template(folder, config))

    def _special(self, key: str) -> str | None:
        return _token_content(self.config.get(key))

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        eos = self._special("eos_token")
        return None if eos is None else self.token_id(eos)

    @property
    def pad_token_id(self) -> int | None:
        pad = self._special("pad_token")
        return None if pad is None else self.token_id(pad)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: eos plus end_of_text/eot/eom when present."""
        ids = {self.token_id(t) for t in _STOP_TOKENS} | {self.eos_token_id}
        return {i for i in ids if i is not None}

    @property
    def image_token_id(self) -> int:
        image_id = self.token_id(IMAGE_TOKEN)
        if image_id is None:
            raise MllamaExportError(f"The tokenizer has no {IMAGE_TOKEN} token; is it mllama's?")
        return image_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids as transformers gives them; BOS comes from the tokenizer's post-processor.

        Text that already starts with BOS (a rendered chat template) gets no second one, like
        transformers' apply_chat_template(tokenize=True) which encodes without special tokens.
        """
        bos = self.bos_token
        add = add_bos and not (bos is not None and text.startswith(bos))
        return self.backend.encode(text, add_special_tokens=add).ids

    def processor_encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids exactly as transformers' MllamaProcessor makes them for one text.

        The processor first runs `build_string_from_input` (BOS text inserted after any leading
        image tokens unless the text holds BOS anywhere), then calls the tokenizer, whose
        post-processor adds one more BOS when `add_special_tokens` is true (its default). So a
        plain "hi" becomes [BOS, BOS, h, i] and "<|image|>hi" becomes [BOS, IMG, BOS, h, i];
        a rendered chat template, passed with add_special_tokens=False, keeps its single BOS.
        """
        text = build_string_from_input(text, self.bos_token or "", IMAGE_TOKEN)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # transformers 5 skips clean_up_tokenization_spaces for BPE, so the raw decode matches.
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(
        self, skip_special_tokens: bool = True, errors: str = "replace"
    ) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens, errors)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> str:
        """Render `messages` like transformers' apply_chat_template(tokenize=False).

        A message's content is a string or a list of {"type": "text", "text": ...} and
        {"type": "image"} parts; extra kwargs (e.g. date_string) reach the template.
        """
        if self.chat_template is None:
            raise MllamaExportError(
                "The tokenizer has no chat_template; expected one in tokenizer_config.json, "
                "chat_template.jinja or chat_template.json."
            )
        if not messages:
            raise MllamaExportError(
                "Cannot apply the chat template to an empty conversation; expected at least one "
                "{'role': 'user', 'content': ...} message."
            )
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
                raise MllamaExportError(
                    f"Chat message {i} is {message!r:.80}; expected a dict with a 'role' "
                    "('system', 'user', 'assistant', ...) and a 'content' (a string or a list "
                    "of {'type': 'text', 'text': ...} and {'type': 'image'} parts)."
                )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        special = {k: self._special(k) for k in _TEMPLATE_TOKEN_KEYS if self.config.get(k)}
        try:
            return self._compiled.render(
                messages=_plain(list(messages)),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**special, **_plain(kwargs)},
            )
        except jinja2.exceptions.TemplateError as e:
            raise MllamaExportError(f"The chat template rejected the messages: {e}") from e


def build_string_from_input(prompt: str, bos_token: str, image_token: str = IMAGE_TOKEN) -> str:
    """transformers' mllama `build_string_from_input`: BOS text after the leading image tokens.

    Text that contains BOS anywhere is returned unchanged.
    """
    if not bos_token or bos_token in prompt:
        return prompt
    leading = 0
    while prompt.startswith(image_token):
        prompt = prompt[len(image_token) :]
        leading += 1
    return f"{image_token * leading}{bos_token}{prompt}"


class StreamDecoder:
    """Turns generated ids into text pieces as soon as they are whole characters.

    A byte-level BPE token (Llama 3's) is a few bytes, and may end inside a multi-byte UTF-8
    character; its first bytes are held until the character's last byte arrives, through an
    incremental UTF-8 decoder. Bytes that can never form a character become U+FFFD (as
    ``decode`` gives them), or, with ``errors="backslashreplace"``, ``\\x80``-style escapes
    that show which bytes they were. With ``errors="replace"`` the pieces concatenate to
    ``decode(all_ids)`` once ``finish()`` is called. Tokenizers that are not byte-level are
    decoded whole and cut where the text stops ending in U+FFFD.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = True, errors: str = "replace"
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._bytes = _byte_table(tokenizer.backend)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self._added = tokenizer.backend.get_added_tokens_decoder()
        self._ids: list[int] = []
        # Decoding restarts at `_prefix` (not 0) to stay O(1) per token; ids up to `_read` are
        # already emitted. Keeping one emitted token of context lets decoders that strip a
        # leading space from the first token (SentencePiece) decode the join correctly.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" when nothing is complete yet)."""
        token_id = int(token_id)
        if self._bytes is None:
            return self._push_text(token_id)
        added = self._added.get(token_id)
        if added is not None:
            if added.special and self._skip:
                return ""
            return self._utf8.decode(added.content.encode("utf-8"))
        token = self._tokenizer.backend.id_to_token(token_id)
        if token is None:
            return ""  # an id past the vocabulary decodes to nothing, as in `decode`
        return self._utf8.decode(bytes(self._bytes.get(ch, 0x3F) for ch in token))

    def finish(self) -> str:
        """Return whatever is held back (bytes that never completed a character)."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces for `ids`, then the held-back tail."""
        for token_id in ids:
            if piece := self.push(token_id):
                yield piece
        if tail := self.finish():
            yield tail

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _push_text(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        if text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


def _byte_table(backend: tokenizers.Tokenizer) -> dict[str, int] | None:
    """GPT-2's byte-level alphabet, character -> byte, where ``backend`` decodes byte-level."""
    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def printable(text: str) -> str:
    """``text`` with every character a terminal would not show as itself escaped (control
    characters, unassigned and private-use code points: ``\\x18``, ``\\u200b``); newlines and
    tabs stay as they are."""
    return "".join(
        ch if ch.isprintable() or ch in "\n\t" else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )

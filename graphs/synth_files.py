"""The tokenizer and image-processor files of a synthetic checkpoint, in Llama 3.2's format.

Only synthetic checkpoints use the trainer and templates here; the Llama 3.2 token names and
CLIP statistics live here too because the runner's tokenizer and image processor (engines/) read
the same facts. No torch and no transformers: engines imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mllama_export.errors import MllamaExportError

BOS = "<|begin_of_text|>"
IMAGE_TOKEN = "<|image|>"
# The 12 special tokens that follow the regular vocabulary, in id order (as in Llama 3.2).
SPECIAL_TOKENS = (
    BOS,
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|finetune_right_pad_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(4)),
)

# CLIP's normalization, which Llama 3.2 Vision's image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Llama 3's pre-tokenizer split, so the synthetic tokenizer segments text like the real one.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Condensed Llama 3.2 Vision Instruct template: same output as the real one for chats
# without tools (system block with dates only when there are no images).
LLAMA32_VISION_CHAT_TEMPLATE = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set image_ns = namespace(has_images=false) %}
{%- for message in messages %}
    {%- for content in message['content'] %}
        {%- if content['type'] == 'image' %}
            {%- set image_ns.has_images = true %}
        {%- endif %}
    {%- endfor %}
{%- endfor %}
{%- if image_ns.has_images and not system_message == "" %}
    {{- raise_exception("Prompting with images is incompatible with system messages.") }}
{%- endif %}
{%- if not image_ns.has_images %}
    {{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
    {{- "Cutting Knowledge Date: December 2023\n" }}
    {{- "Today Date: " + date_string + "\n\n" }}
    {{- system_message }}
    {{- "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for content in message['content'] %}
            {%- if content['type'] == 'image' %}
                {{- '<|image|>' }}
            {%- elif content['type'] == 'text' %}
                {{- content['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Training text for the synthetic tokenizer: enough distinct words for a few hundred merges.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, "
    "and this model reads both: an image encoder turns every tile of the picture into "
    "features, and the language model attends to them through cross-attention layers.",
    "Describe the image in one sentence. What color is the car parked near the house? "
    "There are two cats sleeping on the sofa, and a small brown dog is watching them "
    "from the window. The weather looks cold, with snow on the trees and the road.",
    "When you export a model to ONNX, check that the outputs match the reference within "
    "a tolerance. Engines built with TensorRT run faster on the GPU, but numbers can "
    "differ slightly because kernels use lower precision and fused operations.",
    "User: Can you read the text on this sign? Assistant: Yes, it says that the museum "
    "opens at nine in the morning and closes at six in the evening, except on Mondays.",
    "Numbers like 3, 14, 2024 and 128256 appear in text too; so do symbols such as "
    "(brackets), [lists], {braces}, quotes \"like this\", it's, we're, they've, I'm.",
)


def _train_bpe(num_regular: int) -> tokenizers.Tokenizer:
    """Train byte-level BPE with exactly `num_regular` ids (256 bytes plus merges)."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_regular,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if tok.get_vocab_size() != num_regular:
        raise MllamaExportError(
            f"The built-in corpus yields {tok.get_vocab_size()} BPE tokens; asked for "
            f"{num_regular}; use vocab_size <= {tok.get_vocab_size() + len(SPECIAL_TOKENS)}."
        )
    return tok


def _added_token(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def write_synthetic_tokenizer(
    out_dir: str | Path, vocab_size: int = 512, image_token_id: int | None = None
) -> None:
    """Write a small working Llama-3-style tokenizer for tiny synthetic checkpoints.

    Ids 0..vocab_size-13 are byte-level BPE tokens, the next 12 are Llama 3.2's special tokens
    and `<|image|>` is `image_token_id` (default vocab_size: past the lm_head, like 128256 in
    the real model). Ids between vocab_size and image_token_id become reserved tokens, because
    tokenizers assigns added-token ids contiguously. The built-in corpus allows vocab_size up
    to 666.
    """
    image_token_id = vocab_size if image_token_id is None else image_token_id
    num_regular = vocab_size - len(SPECIAL_TOKENS)
    if num_regular < 256 or image_token_id < vocab_size:
        raise MllamaExportError(
            f"Got vocab_size {vocab_size} and image_token_id {image_token_id}; expected "
            f"vocab_size >= {256 + len(SPECIAL_TOKENS)} (256 byte tokens plus the special "
            "tokens) and image_token_id >= vocab_size."
        )
    extra = [f"<|reserved_special_token_{i}|>" for i in range(4, 4 + image_token_id - vocab_size)]
    specials = [*SPECIAL_TOKENS, *extra, IMAGE_TOKEN]
    tok = _train_bpe(num_regular)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in specials])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, num_regular)]
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special_map, config = _tokenizer_configs(specials, first_id=num_regular)
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _tokenizer_configs(specials: list[str], first_id: int) -> tuple[dict, dict]:
    """special_tokens_map.json and tokenizer_config.json as Llama 3.2 Vision Instruct has them."""
    special_map = {
        "bos_token": BOS,
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
    }
    config = {
        "added_tokens_decoder": {
            str(first_id + i): _added_token(t) for i, t in enumerate(specials)
        },
        **special_map,
        "chat_template": LLAMA32_VISION_CHAT_TEMPLATE,
        # Real checkpoints say true, but transformers 5 ignores it for BPE; false says what happens.
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return special_map, config


def default_preprocessor_config(image_size: int, max_image_tiles: int) -> dict[str, Any]:
    """The ``preprocessor_config.json`` a Llama 3.2 Vision checkpoint ships, for this tile size."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_pad": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "MllamaImageProcessor",
        "image_std": list(CLIP_STD),
        "max_image_tiles": max_image_tiles,
        "processor_class": "MllamaProcessor",
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }

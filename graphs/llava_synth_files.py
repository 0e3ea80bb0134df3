"""The tokenizer and processor files of a synthetic LLaVA checkpoint, in the llava-hf layout
(preprocessor_config.json beside processor_config.json): the twin of graphs/synth_files.py.

No torch and no transformers: the runner's processor (engines/) reads the same defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from mllama_export.errors import MllamaExportError

from .llava_config import LlavaConfig
from .synth_files import CLIP_MEAN, CLIP_STD, _added_token, _train_bpe

# After the regular vocabulary, in id order; the model's rows past them stay unused, as
# llava-hf's 32064 embeddings outnumber its 32002 tokens.
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

# In the style of the llava-hf checkpoints' templates: images first in a user turn, then text.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + content['text'] + '</s>' }}{% endfor %}{% endif %}{% endfor %}"
)


def synthetic_token_ids(config: LlavaConfig) -> dict[str, int]:
    """The ids the synthetic tokenizer gives its special tokens: right after `regular` BPE ids,
    where the config's bos, eos, image and pad ids must already be."""
    regular = (config.text.bos_token_id or 0) - 1
    ids = {t: regular + i for i, t in enumerate(LLAVA_SPECIAL_TOKENS)}
    wanted = {
        "<s>": config.text.bos_token_id,
        "</s>": config.text.eos_token_ids[0] if config.text.eos_token_ids else None,
        "<image>": config.image_token_id,
        "<pad>": config.pad_token_id,
    }
    if (
        regular < 256
        or any(ids[t] != i for t, i in wanted.items())
        or ids["<pad>"] >= config.text.vocab_size
    ):
        raise MllamaExportError(
            f"a synthetic tokenizer puts {list(LLAVA_SPECIAL_TOKENS)} at ids {regular}.."
            f"{regular + 4} after at least 256 BPE tokens; the config has bos/eos/image/pad "
            f"{list(wanted.values())} in {config.text.vocab_size} rows"
        )
    return ids


def write_llava_tokenizer(config: LlavaConfig, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    ids = synthetic_token_ids(config)
    tok = _train_bpe(ids["<unk>"])
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in LLAVA_SPECIAL_TOKENS]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", ids["<s>"])]
    )
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tokenizer_config: dict[str, Any] = {
        "added_tokens_decoder": {str(ids[t]): _added_token(t) for t in LLAVA_SPECIAL_TOKENS},
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.text.max_position_embeddings,
        "processor_class": "LlavaNextProcessor" if config.is_next else "LlavaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "special_tokens_map.json", special)
    template = LLAVA_NEXT_CHAT_TEMPLATE if config.is_next else LLAVA_15_CHAT_TEMPLATE
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def write_llava_processor(config: LlavaConfig, out: Path) -> None:
    """processor_config.json and preprocessor_config.json as the llava-hf checkpoints have them."""
    kind = "LlavaNextProcessor" if config.is_next else "LlavaProcessor"
    _write_json(
        out / "preprocessor_config.json", {**default_image_config(config), "processor_class": kind}
    )
    processor = {
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
        "patch_size": config.vision.patch_size,
        "processor_class": kind,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    _write_json(out / "processor_config.json", processor)


def default_image_config(config: LlavaConfig) -> dict[str, Any]:
    """The image processor settings a llava-hf checkpoint ships, for this model's tower."""
    side = config.vision.image_size
    raw: dict[str, Any] = {
        "crop_size": {"height": side, "width": side},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "LlavaNextImageProcessor"
        if config.is_next
        else "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": side},
    }
    if config.is_next:
        raw.update(do_pad=True, image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints])
    return dict(sorted(raw.items()))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

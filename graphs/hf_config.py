"""What every Hugging Face config.json reader shares, whatever the family: the generic keys of
PretrainedConfig, the rope parameters of a Llama-style decoder, and a key-by-key section reader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mllama_export.errors import MllamaExportError

# PretrainedConfig's serialization and generation defaults. transformers 4.x writes all of them into
# every sub-config of a checkpoint (the published Llama 3.2 Vision config.json has them); none of
# them changes the architecture, so they are accepted and ignored. Anything not listed is an error.
GENERIC_HF_KEYS = frozenset(
    [
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "initializer_range",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "min_length",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
        "use_cache",
    ]
)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 0


# graphs/llava_config.py reads its config.json key by key through `_Section` and `_number` (its
# tests assert their wording); Mllama's sections are declared tables (graphs/config.py).
class _Section:
    """One JSON object read key by key, so that keys nobody took can be reported."""

    def __init__(self, name: str, raw: Any):
        if not isinstance(raw, dict):
            raise MllamaExportError(f"{name} must be a JSON object, got {type(raw).__name__}")
        self.name, self.raw, self.taken = name, raw, set()

    def take(self, key: str) -> Any:
        if key not in self.raw:
            raise MllamaExportError(
                f"{self.name} is missing the key {key!r}; keys present: {', '.join(sorted(self.raw))}"
            )
        self.taken.add(key)
        return self.raw[key]

    def take_int(self, key: str) -> int:
        return _number(self.name, key, self.take(key), int)

    def take_float(self, key: str) -> float:
        return _number(self.name, key, self.take(key), float)

    def take_ints(self, key: str) -> tuple[int, ...]:
        value = self.take(key)
        if not isinstance(value, list):
            raise MllamaExportError(f"{self.name}.{key} is {value!r}; expected a list of integers")
        return tuple(_number(self.name, key, v, int) for v in value)

    def take_optional(self, key: str, default: Any, expect: Any = None) -> Any:
        value = self.raw.get(key, default)
        self.taken.add(key)
        if expect is not None and value != expect:
            raise MllamaExportError(
                f"{self.name}.{key} is {value!r}; mllama-export supports only {expect!r}"
            )
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.taken - GENERIC_HF_KEYS)
        if unknown:
            raise MllamaExportError(
                f"{self.name} has unknown keys {unknown}; this version understands "
                f"{sorted(self.taken)} and ignores PretrainedConfig's generic keys"
            )


def _number(section: str, key: str, value: Any, kind: type) -> Any:
    """An integer (or a number, for floats) from JSON; strings, booleans and floats with a
    fraction where an integer belongs are refused by name."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and kind is int:
        ok = float(value).is_integer()
    if not ok:
        expected = "an integer" if kind is int else "a number"
        raise MllamaExportError(f"{section}.{key} is {value!r}; expected {expected}")
    return kind(value)

"""Mllama's "reference" part: transformers' MllamaForConditionalGeneration, the gate's
independent reference (`--reference transformers`)."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np

from mllama_export.engines.evalset import EvalCase, real_tiles
from mllama_export.engines.inputs import prompt_feed
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.config import MllamaConfig

from .trace import Trace


class TransformersReference:
    """transformers' MllamaForConditionalGeneration in float32, decoding greedily with its
    own cache. Its vision stage is the cross-attention K/V that transformers itself computed
    and cached in the prefill (its cross-attention layers' cache entries), which have our
    layout [B, H_kv, I*T*P, Dh] per layer: the vision encoder, projector, k/v projections and
    k-norm are all judged against transformers' code, not ours.

    The part's API (validate/trace.py Reference): `from_weights(manifest, weights, stack)`,
    then `.label` and `.trace(case, steps) -> Trace`."""

    label = "transformers fp32"

    def __init__(self, model, config: MllamaConfig):
        self.model, self.config = model, config

    @classmethod
    def from_weights(cls, manifest: dict, weights, stack: ExitStack) -> TransformersReference:
        """transformers' model of the float32 weights the artifacts were built from
        (`weights`: validate/gate.py ReferenceWeights), refused for artifacts that differ
        from transformers by design."""
        semantics = manifest["model"]["xattn_mask"]
        if semantics != "hf":
            raise MllamaExportError(
                f"--reference transformers judges artifacts built with --xattn-mask hf only; "
                f"these were built with --xattn-mask {semantics}, which differs from "
                "transformers by design (text before an image ignores it, and the vision "
                "encoder taps layer inputs, as Meta's reference does), so correct artifacts "
                "would fail. Use --reference graphs, or rebuild with --xattn-mask hf"
            )
        try:
            import torch
            from transformers import MllamaForConditionalGeneration
        except ImportError as err:
            raise MllamaExportError(
                f"--reference transformers needs transformers ({err}); "
                "pip install 'mllama-export[reference]'"
            ) from err
        folder = weights.as_folder(stack)
        model = MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        return cls(model.eval(), weights.config)

    def trace(self, case: EvalCase, steps: int) -> Trace:
        import torch

        feed = prompt_feed(self.config, case.prompts, case.images)
        feed = {k: torch.from_numpy(v) for k, v in feed.items()}
        images, kwargs = case.images, {}
        if images is not None:
            kwargs = {
                "pixel_values": torch.from_numpy(images.pixel_values),
                "aspect_ratio_ids": torch.from_numpy(images.aspect_ratio_ids),
                "aspect_ratio_mask": torch.from_numpy(images.aspect_ratio_mask),
                "cross_attention_mask": feed["cross_attention_mask"],
            }
        mask, positions = feed["attention_mask"], feed["position_ids"]
        with torch.inference_mode():
            out = self.model(
                input_ids=feed["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **kwargs,
            )
            cache, logits = out.past_key_values, out.logits
            stages = {}
            if images is not None:
                layers = [cache.layers[i] for i in self.config.text.cross_attention_layers]
                key = torch.stack([layer.keys for layer in layers]).numpy()
                value = torch.stack([layer.values for layer in layers]).numpy()
                stages["vision"] = real_tiles(key, value, case, self.config)
            prefill = logits.numpy()[mask.numpy() != 0]
            tokens = [logits[:, -1].argmax(-1)]
            step_logits = []
            position = positions[:, -1:]
            xmask = feed["cross_attention_mask"][:, -1:]
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                step_kwargs = {"cross_attention_mask": xmask} if images is not None else {}
                out = self.model(
                    input_ids=tokens[-1][:, None],
                    attention_mask=mask,
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                    **step_kwargs,
                )
                cache = out.past_key_values
                step_logits.append(out.logits[:, -1].numpy())
                tokens.append(out.logits[:, -1].argmax(-1))
        return Trace(stages, prefill, step_logits, torch.stack(tokens).numpy().astype(np.int64))


def synthetic_model(config: MllamaConfig, seed: int, semantics: str):
    """Our MllamaModel in float32 with the weights `synth` writes for `seed`, made in memory
    (the gate's graphs reference of artifacts built from a preset)."""
    import torch

    from mllama_export.graphs.layers import rope_inv_freq
    from mllama_export.graphs.model import MllamaModel
    from mllama_export.graphs.synth import random_state_dict

    with torch.device("meta"):
        model = MllamaModel(config, semantics)
    model.load_state_dict(random_state_dict(config, seed), assign=True, strict=True)
    model.text.rotary.inv_freq = rope_inv_freq(config.text.rope, config.text.head_dim)
    return model.eval()

"""LLaVA's "reference" and "synthetic_model" parts: transformers' LlavaForConditionalGeneration
and LlavaNextForConditionalGeneration as the gate's independent reference (`--reference
transformers`), and our LlavaModel made in memory from a preset's seed (`--reference graphs`).

A LLaVA evaluation case is read as the gate passes it (engines/evalset.py's protocol):
`.prompts`, token ids per row with each image's tokens already expanded, and `.images`, None
for a text-only case or the vision graph's input for the batch: `.pixel_values` (every tile of
every image, in prompt order, [N, C, H, W]) and `.image_sizes` (per row, the (height, width)
of each image), as engines/llava_preprocess.py's LlavaImages holds them.

The stage judged before prefill, `vision`, is the projected features of every tile,
[N, tile_tokens, text_hidden], in the vision graph's tile order: what transformers' own
multi_modal_projector returned inside its forward (captured with a forward hook), so that the
tower, the feature-layer selection and the projector are all judged against its code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np

from mllama_export.engines.llava_text import left_pad
from mllama_export.errors import MllamaExportError
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_layout import image_tiles

from .trace import Trace

_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}


def pad_id(config: LlavaConfig) -> int:
    """The id left padding is written with (never attended: any id would do)."""
    for candidate in (config.pad_token_id, config.text.pad_token_id):
        if candidate is not None:
            return candidate
    return 0


def hf_pixel_inputs(
    config: LlavaConfig, pixels: np.ndarray, image_sizes: Sequence[Sequence[tuple[int, int]]]
) -> dict[str, Any]:
    """transformers' image inputs for the tiles of a batch (our vision graph's input): LLaVA
    1.5's [images, C, H, W]; LLaVA-NeXT's [images, most tiles, C, H, W], zero-padded past
    each image's tiles, with image_sizes."""
    import torch

    sizes = [tuple(int(v) for v in s) for row in image_sizes for s in row]
    counts = [image_tiles(config, s) for s in sizes]
    if sum(counts) != len(pixels):
        raise MllamaExportError(
            f"the case has {len(pixels)} tiles but its {len(sizes)} images take {sum(counts)} "
            f"({counts}); expected the tiles of every image, in prompt order"
        )
    if not config.is_next:
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels))}
    padded = np.zeros((len(sizes), max(counts), *pixels.shape[1:]), pixels.dtype)
    for i, start in enumerate(np.cumsum([0, *counts[:-1]])):
        padded[i, : counts[i]] = pixels[start : start + counts[i]]
    return {"pixel_values": torch.from_numpy(padded), "image_sizes": torch.tensor(sizes)}


class TransformersReference:
    """transformers' LLaVA model in float32, decoding greedily with its own cache.

    The part's API (validate/trace.py Reference): `from_weights(manifest, weights, stack)`,
    then `.label` and `.trace(case, steps) -> Trace`."""

    label = "transformers fp32"

    def __init__(self, model, config: LlavaConfig):
        self.model, self.config = model, config

    @classmethod
    def from_weights(cls, manifest: dict, weights, stack: ExitStack) -> TransformersReference:
        """transformers' model of the float32 weights the artifacts were built from
        (`weights`: validate/gate.py ReferenceWeights)."""
        config = weights.config
        try:
            import torch
            import transformers
        except ImportError as err:
            raise MllamaExportError(
                f"--reference transformers needs transformers ({err}); "
                "pip install 'mllama-export[reference]'"
            ) from err
        name = _CLASSES[config.model_type]
        model_class = getattr(transformers, name, None)
        if model_class is None:
            raise MllamaExportError(
                f"--reference transformers needs transformers' {name}, which transformers "
                f"{transformers.__version__} lacks; expected transformers 5.x"
            )
        folder = weights.as_folder(stack)
        model = model_class.from_pretrained(folder, dtype=torch.float32)
        return cls(model.eval(), config)

    def trace(self, case: Any, steps: int) -> Trace:
        import torch

        batch = left_pad(case.prompts, pad_id(self.config))
        ids, mask = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask"))
        positions = torch.from_numpy(batch["position_ids"])
        kwargs = {}
        if case.images is not None:
            kwargs = hf_pixel_inputs(self.config, case.images.pixel_values, case.images.image_sizes)
        with torch.inference_mode(), _Captured(self.model) as features:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            )
        stages = {"vision": features.tiles()} if case.images is not None else {}
        prefill = out.logits.numpy()[batch["attention_mask"] != 0]
        step_logits, tokens = self._decode(out, mask, positions, steps)
        return Trace(stages, prefill, step_logits, tokens)

    def _decode(self, out, mask, positions, steps: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Greedy steps on transformers' own cache: (logits per step [B, V], tokens
        [steps + 1, B], tokens[i] being the input of step i)."""
        import torch

        cache, length = out.past_key_values, mask.shape[1]
        # transformers 5.x renames past_key_values to cache (the old name warns until 5.40)
        forward = inspect.signature(self.model.forward).parameters
        cache_arg = "cache" if "cache" in forward else "past_key_values"
        tokens = [out.logits[:, -1].argmax(-1)]
        position = positions[:, -1:]
        step_logits = []
        with torch.inference_mode():
            for step in range(steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                out = self.model(
                    input_ids=tokens[-1][:, None],
                    attention_mask=mask,
                    position_ids=position,
                    cache_position=torch.tensor([length + step]),
                    use_cache=True,
                    **{cache_arg: cache},
                )
                cache = out.past_key_values
                step_logits.append(out.logits[:, -1].numpy())
                tokens.append(out.logits[:, -1].argmax(-1))
        return step_logits, torch.stack(tokens).numpy().astype(np.int64)


class _Captured:
    """The outputs of transformers' multi_modal_projector during one forward: the projected
    features of every tile, in the order transformers fed them (ours: prompt order)."""

    def __init__(self, model):
        self.projector = model.model.multi_modal_projector
        self.outputs: list = []
        self.handle = None

    def __enter__(self) -> _Captured:
        self.handle = self.projector.register_forward_hook(
            lambda module, args, output: self.outputs.append(output.detach().clone())
        )
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def tiles(self) -> np.ndarray:
        # each call: [tiles, tile_tokens, text_hidden] -> all of them, [N, P, D]
        if not self.outputs:
            raise MllamaExportError(
                "transformers ran no image through its projector for a case with images; "
                "expected its image tokens in the prompt"
            )
        import torch

        return torch.cat(self.outputs).numpy()


def synthetic_model(config: LlavaConfig, seed: int, **model_options):
    """Our LlavaModel in float32 with the weights `synth` writes for `seed`
    (graphs/synthetic.py), made in memory: the gate's graphs reference of artifacts built
    from a preset. LLaVA's model takes no options; any given is refused."""
    import torch

    from mllama_export.graphs.checkpoint import checkpoint_format, materialize_buffers
    from mllama_export.graphs.family import family_of
    from mllama_export.graphs.llava_model import LlavaModel
    from mllama_export.graphs.synthetic import random_state_dict

    if model_options:
        raise MllamaExportError(
            f"LLaVA's model takes no options; the manifest gave {sorted(model_options)}"
        )
    with torch.device("meta"):
        model = LlavaModel(config)
    model.load_state_dict(random_state_dict(config, seed), assign=True, strict=True)
    materialize_buffers(model, checkpoint_format(family_of(config)).buffers(config))
    return model.eval()

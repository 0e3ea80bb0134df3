"""What the build asks a family besides its graphs and weights, through the family's optional
"build" part (Mllama's: exporter/mllama_build.py, whose docstring is the part's API). A family
without the part, or a part without one of the names, gets the default here: every dynamic dim
of its contract bounded by --max-batch ("batch") or --max-seq-len (any other), token ids below
its vocabulary size, attention masks of ones, no model options and no manifest fields of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from mllama_export.graphs.choices import DEFAULT_MAX_SEQ_LEN
from mllama_export.graphs.family import Family, family_of, family_of_config
from mllama_export.graphs.spec import TensorSpec


def hook(family: Family, name: str) -> Any:
    """The family's ``name`` from its "build" part, else the default of this module."""
    part = family.part("build") if family.has("build") else None
    if part is not None and hasattr(part, name):
        return getattr(part, name)
    return _DEFAULTS[name](family)


def example_sizes(family: Family) -> dict[str, int]:
    """Distinct sizes of at least 2 for the dynamic dims, so that none is specialized."""
    dims = [d for d in family.part("contract").DYNAMIC_DIMS if d != "batch"]
    return {"batch": 2, **{d: 5 + 2 * i for i, d in enumerate(dims)}}


def dims_for(config: Any, options) -> dict:
    """torch.export dims of every dynamic dim of ``config``'s family, as the options bound."""
    return hook(family_of(config), "dims_for")(config, options)


def example_inputs(
    specs: tuple[TensorSpec, ...], config: Any, dtype, sizes=None, seed: int = 0
) -> tuple:
    """Random valid inputs of ``config``'s family for ``specs``: the family's own, else ours."""
    return hook(family_of(config), "example_inputs")(specs, config, dtype, sizes, seed)


def manifest_model_options(manifest: dict) -> dict[str, Any]:
    """The keyword arguments of the family's model that built these artifacts, read back from
    their manifest: the reference the gate and sensitivity judge against is that model."""
    family = family_of_config(manifest["model"]["config"])
    return hook(family, "manifest_model_options")(manifest)


def _default_dims(family: Family):
    from torch.export import Dim

    def dims_for(config: Any, options) -> dict:
        sizes = example_sizes(family)
        return {
            d: Dim(
                d, min=1, max=max(options.max_batch if d == "batch" else options.max_seq_len, n + 1)
            )
            for d, n in sizes.items()
        }

    return dims_for


def _default_inputs(family: Family):
    def example_inputs(specs, config, dtype, sizes=None, seed: int = 0) -> tuple:
        sizes = {**family.part("contract").static_dims(config), **(sizes or example_sizes(family))}
        ranges = {"input_ids": (0, config.vocab_size), "attention_mask": (1, 2)}
        gen = torch.Generator().manual_seed(seed)
        tensors = []
        for spec in specs:
            shape = spec.shape(sizes)
            if spec.dtype == "int64":
                low, high = ranges.get(spec.name, (0, 2))
                tensors.append(torch.randint(low, high, shape, generator=gen))
            else:
                tensors.append(torch.randn(shape, generator=gen).to(dtype))
        return tuple(tensors)

    return example_inputs


_DEFAULTS = {
    "EXAMPLE_SIZES": example_sizes,
    "dims_for": _default_dims,
    "example_inputs": _default_inputs,
    "model_options": lambda family: lambda options: {},
    "manifest_model": lambda family: lambda options: {},
    "manifest_model_options": lambda family: lambda manifest: {},
    "option_problems": lambda family: lambda options, config: [],
    "default_max_seq_len": lambda family: lambda config, max_images: DEFAULT_MAX_SEQ_LEN,
}

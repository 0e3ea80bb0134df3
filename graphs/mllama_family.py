"""Llama 3.2 Vision (transformers' `mllama`): the first family, and the one place that names
the modules that are Mllama's own. Everything else reaches them through this object."""

from __future__ import annotations

from .family import Family

MLLAMA = Family(
    name="mllama",
    title="Llama 3.2 Vision (mllama)",
    model_types=("mllama",),
    parts={
        "config": "graphs.config:MllamaConfig",
        "presets": "graphs.config:PRESETS",
        "contract": "graphs.contract",
        "graph_modules": "graphs.model:GRAPH_MODULES",
        "model": "graphs.model:MllamaModel",
        "checkpoint_format": "graphs.weights:FORMAT",
        "checkpoint": "graphs.checkpoint:Checkpoint",
        "load_model": "graphs.weights:load_model",
        "synth": "graphs.synthetic:write_checkpoint",
        "truncated": "graphs.synth:shallower",
        "inputs": "engines.inputs:InputProcessor",
        "session": "engines.mllama_session:MllamaSession",
        "evalset": "engines.evalset",
        "profiles": "engines.profiles",
        "build": "exporter.mllama_build",
        "check": "exporter.checkplan",
        "fp8": "exporter.fp8",
        "plan": "exporter.fits",
        "reference": "validate.mllama_reference:TransformersReference",
    },
    modules=(
        "graphs.config",
        "graphs.contract",
        "graphs.model",
        "graphs.vision",
        "graphs.text",
        "graphs.weights",
        "graphs.synth",
        "graphs.mllama_family",
        "engines.inputs",
        "engines.preprocess",
        "engines.evalset",
        "engines.steps",
        "engines.profiles",
        "engines.mllama_session",
        "exporter.mllama_build",
        "exporter.checkplan",
        "exporter.fp8",
        "exporter.fp8_cases",
        "exporter.layerwise",
        "exporter.calibrate",
        "exporter.plan",
        "exporter.fits",
        "validate.mllama_reference",
    ),
)

"""LLaVA 1.5 and LLaVA-NeXT (transformers' `llava` and `llava_next`): the second family, and the
one place that names the modules that are LLaVA's own. Everything else reaches them through
this object (docs/architecture.md, "Where a second model family goes")."""

from __future__ import annotations

from .family import Family

LLAVA = Family(
    name="llava",
    title="LLaVA 1.5 / LLaVA-NeXT (llava, llava_next)",
    model_types=("llava", "llava_next"),
    example="a LLaVA checkpoint such as llava-hf/llava-1.5-7b-hf",
    converted_from=("llava_llama", "llava_mistral", "llava_mpt"),
    parts={
        "config": "graphs.llava_config:LlavaConfig",
        "presets": "graphs.llava_presets:PRESETS",
        "contract": "graphs.llava_contract",
        "graph_modules": "graphs.llava_model:GRAPH_MODULES",
        "model": "graphs.llava_model:LlavaModel",
        "checkpoint_format": "graphs.llava_weights:FORMAT",
        "checkpoint": "graphs.checkpoint:Checkpoint",
        "load_model": "graphs.checkpoint:load_model",
        "synth": "graphs.synthetic:write_checkpoint",
        "truncated": "graphs.llava_synth:truncated",
        "build": "exporter.llava_build",
        "check": "exporter.llava_checkplan",
        "inputs": "engines.llava_inputs:LlavaInputProcessor",
        "session": "engines.llava_session:LlavaSession",
        "evalset": "engines.llava_evalset",
        "profiles": "engines.llava_profiles",
        "fp8": "exporter.llava_fp8",
        "plan": "exporter.llava_fits",
        "layerwise": "exporter.llava_layerwise",
        "reference": "validate.llava_reference:TransformersReference",
        "synthetic_model": "validate.llava_reference:synthetic_model",
    },
    modules=(
        "graphs.llava_config",
        "graphs.llava_contract",
        "graphs.llava_layout",
        "graphs.llava_model",
        "graphs.llava_presets",
        "graphs.llava_synth",
        "graphs.llava_synth_files",
        "graphs.llava_text",
        "graphs.llava_vision",
        "graphs.llava_weights",
        "graphs.llava_family",
        "engines.llava_evalset",
        "engines.llava_inputs",
        "engines.llava_preprocess",
        "engines.llava_session",
        "engines.llava_text",
        "engines.llava_profiles",
        "exporter.llava_fits",
        "exporter.llava_fp8",
        "exporter.llava_layerwise",
        "exporter.llava_plan",
        "validate.llava_reference",
        "exporter.llava_build",
        "exporter.llava_checkplan",
    ),
)

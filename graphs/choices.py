"""Every closed set of choices the project takes, declared once.

The CLI builds its `click.Choice` lists and help texts from here, and the library checks
its arguments against the same tuples, so a new precision or backend is added in one line.
Plain Python only (no torch, numpy or onnx), so that `mllama-export --help` stays cheap.
Where a command takes only part of a list, the part is derived here with its reason.
"""

from __future__ import annotations

# --precision: the graphs' weights and activations. fp8 quantizes the text decoder's linear
# layers (FP8 weights and inputs, explicit Q/DQ); everything else is then float16.
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
# precision -> the dtype name (torch's and numpy's alike) of the graphs' weights and I/O
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp8": "float16"}
# synth --dtype: the precisions a checkpoint stores its tensors in. fp8 is a quantization
# the build applies to 16-bit graphs, not a safetensors dtype of our checkpoints.
STORAGE_PRECISIONS = tuple(p for p in PRECISIONS if p != "fp8")

# --model / --preset: the synthetic presets (graphs/config.py PRESETS holds their configs)
PRESET_NAMES = ("tiny", "11b", "90b")

# --backend: what runs the graphs. onnx-reference: onnx.reference on the CPU, slow; it runs
# bfloat16, which ONNX Runtime's CPU provider cannot (engines/onnxref.py)
BACKENDS = ("onnxruntime", "onnx-reference", "tensorrt")
DEFAULT_BACKEND = "onnxruntime"
# --device: ONNX Runtime's provider (TensorRT always runs on the GPU)
DEVICES = ("cpu", "cuda")

# --xattn-mask: meta, Meta's reference (text before any image ignores the images);
# hf, bit-compatible with transformers 5.x (graphs/text.py)
MASK_SEMANTICS = ("meta", "hf")
# --max-seq-len when not given, where the family has no default of its own (LLaVA has: its
# images' tokens are part of the sequence, exporter/llava_build.py default_max_seq_len)
DEFAULT_MAX_SEQ_LEN = 512
# Mllama's when --xattn-mask is not given (a family without cross-attention refuses it)
DEFAULT_MASK = "meta"
# --check-depth: the check against PyTorch on the whole model, a reduced copy, or whichever fits
CHECK_DEPTHS = ("auto", "full", "reduced")
# --engines: TensorRT engines where TensorRT and a GPU exist, never, or refused up front
ENGINE_MODES = ("auto", "skip", "require")
# --text-engine: a prefill and a decode engine, each with its own copy of the text weights,
# or one engine of the decode (step) graph serving both phases (docs/tensorrt.md)
TEXT_ENGINES = ("split", "shared")
DEFAULT_TEXT_ENGINE = "split"
# --fp8-weights: one FP8 weight scale per tensor or per output channel (graphs/quant.py)
WEIGHT_SCHEMES = ("per-tensor", "per-channel")
# validate --reference: our PyTorch graphs, or transformers' MllamaForConditionalGeneration
REFERENCES = ("graphs", "transformers")
# plan --gpu: the GPUs planned against (exporter/planning.py GPUS holds their figures)
GPU_NAMES = ("h100", "h200")


def spelled(choices: tuple[str, ...], last: str = "or") -> str:
    """'tiny, 11b or 90b': a list of choices as help texts write it."""
    return ", ".join(choices[:-1]) + f" {last} {choices[-1]}" if len(choices) > 1 else choices[0]

"""exporter: checkpoint in, artifacts out: the build's checks and memory plan, streamed ONNX
export, FP8 calibration, each graph's check against PyTorch, TensorRT engines, manifest.json.

Imports graphs and engines, never validate. Start at buildplan.py (what a build checks and
decides, before any work: one frozen BuildPlan), then build.py (`mllama-export build`, which
executes it), streaming.py (the export) and engine_stage.py (the TensorRT stage).
"""

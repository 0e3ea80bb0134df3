"""exporter: checkpoint in, artifacts out: the build's checks and memory plan, streamed ONNX
export, FP8 calibration, each graph's check against PyTorch, TensorRT engines, manifest.json.

Imports graphs and engines, never validate. Start at build.py (`mllama-export build`), then
streaming.py (the export) and engines.py (the TensorRT stage).
"""

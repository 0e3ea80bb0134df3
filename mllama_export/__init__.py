"""mllama-export: Llama 3.2 Vision to ONNX and TensorRT."""

__version__ = "0.1.0"

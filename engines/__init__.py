"""engines: running built artifacts: manifest checks, backends behind one `infer(feed)` contract
(ONNX Runtime, TensorRT, onnx.reference, PyTorch), the runner chaining vision -> prefill ->
decode, tokenizer, image preprocessing and the evaluation set.

Imports graphs only, never exporter or validate. Start at runner.py (`Runner.from_artifacts`),
then inputs.py (prompts and images to feeds), artifacts.py and backend.py.
"""

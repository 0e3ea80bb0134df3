"""engines: running built artifacts: manifest checks, backends behind one `infer(feed)` contract
(ONNX Runtime, TensorRT, onnx.reference, PyTorch), the generic runner (sampling, stop and
forced tokens, logits, timings, streaming text) and each family's engines parts: Mllama's
session (vision -> prefill -> decode steps over a KV cache: mllama_session.py, steps.py),
input processor (inputs.py, preprocess.py), evaluation set and profile scheme.

Imports graphs only, never exporter or validate. Start at runner.py (`Runner.from_artifacts`),
then mllama_session.py (what a family's session does), artifacts.py and backend.py.
"""

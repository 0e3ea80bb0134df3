"""graphs: the model as it is exported: frozen configs, the PyTorch graph modules whose forward
signatures are the ONNX contracts, strict weight loading, synthetic checkpoints, build limits, the choices every command
takes (choices.py) and the one strict JSON reader (strict.py).

The bottom folder: it imports nothing of engines, exporter or validate. Start at contract.py
(what each graph takes and returns), then model.py (the three graphs) and config.py.
"""

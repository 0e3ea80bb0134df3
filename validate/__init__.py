"""validate: the accuracy gate: the artifacts' drift from PyTorch or transformers, stage by
stage, with its metrics, thresholds, report, and per-layer FP8 sensitivity.

The top folder below the CLI: imports graphs, engines and exporter. Start at gate.py, then
thresholds.py and report.py (plot.py draws the report's picture). The gate reaches a family
through its parts (its evaluation set, its model and weights); mllama_reference.py is
Mllama's transformers reference.
"""

"""onnx-neq: budgeted, velocity-selected neuron fine-tuning on ONNX Runtime training.

Pipeline: export (torch -> ONNX) -> prepare (graph passes, ORT artifacts, manifest)
-> train (ORT training loop + numpy selectors) -> inference model.
"""

__version__ = "0.1.0"

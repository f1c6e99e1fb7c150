"""Training backends: the host-side pieces of the portable (stock onnxruntime) backend."""

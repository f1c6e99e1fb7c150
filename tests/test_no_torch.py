"""The training path runs on a board with onnxruntime-training and numpy but no torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this board")
sys.meta_path.insert(0, _NoTorch())
"""

TRAIN_STEP = """
import numpy as np
from onnx_neq.backends.ort_training import TrainingSession
s = TrainingSession(sys.argv[1])
x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
loss, _ = s.train_step(x, np.array([0, 1, 2, 3]), 0.1)
logits, taps = s.eval_batch(x)
assert np.isfinite(loss) and logits.shape == (4, 5) and len(taps) == 3
print("torch imported:", "torch" in sys.modules)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120)


def test_training_session_works_without_torch(tiny_artifacts):
    result = _python("import sys\n" + BLOCK_TORCH + TRAIN_STEP, str(tiny_artifacts))
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout


def test_training_session_does_not_import_installed_torch(tiny_artifacts):
    result = _python("import sys\n" + TRAIN_STEP, str(tiny_artifacts))
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout

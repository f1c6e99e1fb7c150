"""Sparse Update schemes: built-in MobileNetV2 schemes 1-5, or a JSON/YAML file for any model.

A scheme maps conv index (graph order, = torchvision module order) -> ratio of output channels
kept (those of largest weight L2 norm). File format, JSON or YAML:
    {"layers": {"27": 1.0, "features.11.conv.2": 0.125}}      keys: conv index or layer name
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onnx_neq.errors import NeqError
from onnx_neq.manifest import Manifest
from onnx_neq.selection.cost_model import CostModel
from onnx_neq.selection.selectors import SU_SCHEMES, select_su

MOBILENET_V2_CONVS = 52
MAX_SCHEME_BYTES = 1 << 20  # a scheme names at most a few thousand layers


def su_selection(spec: str | None, manifest: Manifest, norms: list[np.ndarray], model: CostModel, amount: int | None) -> np.ndarray:
    """The one Sparse Update picker: the mask over all neurons of scheme `spec` (built-in "1".."5" or a
    JSON/YAML file); without one, of the largest built-in scheme whose cost in `model`'s unit (BatchNorm
    parameters included with --bn-update selected, reach included for compute and memory) is <= amount.
    In each listed layer, the channels of largest weight norm (`norms`, one array per layer)."""
    if spec is not None:
        return select_su(norms, _named_scheme(spec, manifest))
    check_builtin_schemes(manifest)
    costs = {k: model.cost(select_su(norms, scheme)) for k, scheme in SU_SCHEMES.items()}
    fitting = [k for k in SU_SCHEMES if amount is not None and costs[k] <= amount]
    if not fitting:
        raise NeqError(f"no built-in Sparse Update scheme fits the budget of {amount:,} {model.unit}; raise it or pass --su-scheme FILE")
    return select_su(norms, SU_SCHEMES[max(fitting, key=costs.__getitem__)])


def nearest_builtin_scheme(manifest: Manifest, model: CostModel, amount: int) -> int:
    """The built-in scheme whose cost in `model`'s unit is nearest `amount` (ties: the lower number). A
    scheme's cost does not depend on which channels of a layer it keeps, so no weights are needed."""
    check_builtin_schemes(manifest)
    flat = [np.zeros(layer.out_channels) for layer in manifest.layers]
    return min(SU_SCHEMES, key=lambda k: abs(model.cost(select_su(flat, SU_SCHEMES[k])) - amount))


def _named_scheme(spec: str, manifest: Manifest) -> dict[int, float]:
    if spec.isdigit():
        if int(spec) not in SU_SCHEMES:
            raise NeqError(f"--su-scheme {spec}: built-in schemes are 1-5")
        check_builtin_schemes(manifest, f"Sparse Update scheme {spec}")
        return SU_SCHEMES[int(spec)]
    return _from_file(Path(spec), manifest)


def check_builtin_schemes(manifest: Manifest, what: str = "the built-in Sparse Update schemes") -> None:
    if len(manifest.layers) != MOBILENET_V2_CONVS:
        raise NeqError(
            f"{what} are for MobileNetV2 ({MOBILENET_V2_CONVS} convs); this model has {len(manifest.layers)}: pass --su-scheme FILE"
        )


def _from_file(path: Path, manifest: Manifest) -> dict[int, float]:
    if not path.exists():
        raise NeqError(f"--su-scheme {path}: no such file (or give a built-in scheme 1-5)")
    if not path.is_file() or path.stat().st_size > MAX_SCHEME_BYTES:
        raise NeqError(f"--su-scheme {path} is not a regular file of at most {MAX_SCHEME_BYTES >> 20} MiB")
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except NeqError:
        raise
    except Exception as exc:
        raise NeqError(
            f'--su-scheme {path} cannot be parsed ({exc.__class__.__name__}); expected {{"layers": {{index or name: ratio}}}}'
        ) from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise NeqError(f'--su-scheme {path}: expected {{"layers": {{index or name: ratio}}}}')
    names = {layer.name: i for i, layer in enumerate(manifest.layers)}
    scheme = {}
    for key, ratio in layers.items():
        index = int(key) if str(key).isdecimal() and len(str(key)) < 10 else names.get(str(key))
        if index is None or not 0 <= index < len(manifest.layers):
            raise NeqError(
                f"--su-scheme {path}: no conv {str(key)[:60]!r} in this model (indices 0-{len(manifest.layers) - 1} or layer names)"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise NeqError(f"--su-scheme {path}: the ratio for {str(key)[:60]!r} is {str(ratio)[:40]!r}; it must be a number in [0, 1]")
        scheme[index] = float(ratio)
    return scheme


def _yaml(text: str):
    try:
        import yaml
    except ImportError:
        raise NeqError("a YAML --su-scheme needs PyYAML (pip install pyyaml), or write it as .json") from None
    return yaml.safe_load(text)

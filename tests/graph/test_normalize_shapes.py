"""normalize.infer_shapes: onnx's shape inference through onnx-ir's ShapeInferencePass, with the initializers
in their order and a failure silent (the model as it was)."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from graph_testing import floats, from_text, snapshot
from onnx_ir.passes.common import ShapeInferencePass

from onnx_neq.graph.normalize import infer_shapes


def test_shapes_are_those_onnx_infers():
    model = from_text(f"""
        g (float[N, 3, 8, 8] x) => (float[N, 4] y) <float[4, 3, 3, 3] w = {{{floats(108, 0)}}}> {{
            c = Conv <strides = [2, 2]> (x, w)
            p = GlobalAveragePool (c)
            y = Flatten (p)
        }}
    """)
    expected = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in expected.graph.value_info}
    assert infer_shapes(model)
    assert {v.name: [d if isinstance(d, int) else d.value for d in v.shape] for node in model.graph for v in node.outputs} == {
        "c": dims["c"],
        "p": dims["p"],
        "y": ["N", 4],
    }
    assert dims["c"] == ["N", 4, 3, 3]


def test_initializers_keep_their_order():
    """The pass alone would put `big` (over the 1 kB it sets aside) after `small`."""
    text = f"""
        g (float[N, 300] x) => (float[N, 300] y) <float[300] big = {{{floats(300, 0)}}}, float[1] small = {{1.0}}> {{
            a = Add (x, small)
            y = Mul (a, big)
        }}
    """
    model = from_text(text)
    infer_shapes(model)
    assert list(model.graph.initializers) == ["big", "small"]
    alone = from_text(text)
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(alone)
    assert list(alone.graph.initializers) == ["small", "big"]  # what the order would be without infer_shapes' care


def test_a_failure_leaves_the_model_as_it_was_and_says_nothing(caplog):
    model = from_text("g (float[N, 3] x) => (float[N, 3] y) { y = Reshape (x) }")  # Reshape without its shape input
    before = snapshot(model)
    with caplog.at_level(logging.DEBUG):
        assert not infer_shapes(model)
    assert snapshot(model) == before and not caplog.records

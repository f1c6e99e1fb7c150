"""DropoutRemovalPass: a Dropout nobody reads the mask of goes (consumers read its input: the eval-mode
function, by hand); one whose mask is read, or a graph without Dropout, is untouched."""

from __future__ import annotations

import numpy as np
from graph_testing import from_text, run_ort, snapshot

from onnx_neq.graph.passes.dropout_removal import DropoutRemovalPass

INSIDE = """
    g (float[N, 4] x) => (float[N, 4] y) {
        ratio = Constant <value = float {0.5}> ()
        train = Constant <value = bool {1}> ()
        d, mask = Dropout (x, ratio, train)
        y = Relu (d)
    }
"""
AT_OUTPUT = """
    g (float[N, 4] x) => (float[N, 4] y) {
        r = Relu (x)
        y = Dropout (r)
    }
"""


def test_a_dropout_inside_the_graph_goes(rng):
    model = from_text(INSIDE)
    result = DropoutRemovalPass()(model)
    assert result.modified and result.report.removed == 1
    assert not any(n.op_type == "Dropout" for n in model.graph)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0], np.maximum(x, 0))


def test_a_dropout_at_the_output_becomes_an_identity_of_the_same_name(rng):
    model = from_text(AT_OUTPUT)
    result = DropoutRemovalPass()(model)
    assert result.modified and result.report.removed == 1
    assert [n.op_type for n in model.graph] == ["Relu", "Identity"] and model.graph.outputs[0].name == "y"
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(model, {"x": x})[0], np.maximum(x, 0))


def test_a_read_mask_or_no_dropout_is_untouched():
    mask_output = INSIDE.replace("=> (float[N, 4] y)", "=> (float[N, 4] y, bool[N, 4] mask)")
    mask_read = INSIDE.replace("y = Relu (d)", "m = Cast <to = 1> (mask)\n y = Mul (d, m)")
    plain = "g (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }"
    for model in map(from_text, (mask_output, mask_read, plain)):
        before = snapshot(model)
        result = DropoutRemovalPass()(model)
        assert not result.modified and result.report.removed == 0
        assert snapshot(model) == before


def test_one_pass_object_twice_gives_the_same_result():
    drop = DropoutRemovalPass()
    first, second = from_text(AT_OUTPUT), from_text(AT_OUTPUT)
    a, b = drop(first), drop(second)
    assert a.modified and b.modified and a.report == b.report
    assert snapshot(first) == snapshot(second)
    again = drop(first)  # nothing left: a count that never resets would say modified
    assert not again.modified and again.report.removed == 0

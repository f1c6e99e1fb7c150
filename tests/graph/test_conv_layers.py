"""find_conv_layers / find_head_conv on tiny graphs: which Convs are layers with neurons, and their costs and names."""

from __future__ import annotations

from graph_testing import floats, from_text

from onnx_neq.graph.conv_layers import find_conv_layers, find_head_conv


def test_find_conv_layers_costs_and_names():
    model = from_text(
        f"""
        g (float[N, 3, 4, 4] x) => (float[N, 2] y)
          <float[6, 3, 1, 1] w = {{{floats(18, 0)}}}, float[6] b = {{{floats(6, 1)}}}, float[2, 6] fc = {{{floats(12, 2)}}}> {{
            c = Conv <group = 1> (x, w, b)
            r = Relu (c)
            p = GlobalAveragePool (r)
            f = Flatten (p)
            y = Gemm <transB = 1> (f, fc)
        }}
        """,
        {"w": "conv.weight", "b": "conv.bias"},
    )
    layers = find_conv_layers(model)
    assert [(l.name, l.kind, l.out_channels, l.neuron_cost) for l in layers] == [("conv", "conv", 6, 3 * 1 * 1 + 1)]
    assert layers[0].mask_input == "conv.neq_mask" and not layers[0].mask_input.endswith("_grad")


def test_a_1x1_conv_feeding_the_output_is_the_classifier_not_neurons():
    """SqueezeNet-style: Conv 1x1 -> Relu -> GlobalAveragePool -> output is the head."""
    model = from_text(
        f"""
        g (float[N, 3, 4, 4] x) => (float[N, 6] y) <float[6, 3, 1, 1] w = {{{floats(18, 0)}}}> {{
            c = Conv (x, w)
            r = Relu (c)
            p = GlobalAveragePool (r)
            y = Flatten (p)
        }}
        """
    )
    assert find_head_conv(model) is not None and find_conv_layers(model) == []

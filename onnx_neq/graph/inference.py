"""Inference models: no Dropout, BatchNorm in inference mode, no masks, no taps."""

from __future__ import annotations

import onnx


def to_inference_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forward graph of a training-mode export, as ONNX Runtime inference runs it."""
    import onnx_ir as ir

    from onnx_neq.graph import pipelines

    ir_model = ir.serde.deserialize_model(model)
    pipelines.run("inference", ir_model)
    return ir.serde.serialize_model(ir_model)


def inference_from_eval(eval_model: onnx.ModelProto, params: dict, manifest) -> onnx.ModelProto:
    """The artifacts' eval graph as an inference model: parameters baked in as initializers, the
    image input only, the logits output only (taps, labels and loss dropped), and the source model's
    output activation put back. What ORT's export_model_for_inferencing writes, without ORT training."""
    from onnx import numpy_helper

    from onnx_neq.graph.passes.output_activation import append_output_activation

    graph = eval_model.graph
    needed = _needed_nodes(graph, manifest.logits_output)
    used = {name for node in needed for name in node.input}
    model = onnx.ModelProto()
    model.CopyFrom(eval_model)
    del model.graph.node[:], model.graph.input[:], model.graph.output[:], model.graph.initializer[:]
    model.graph.node.extend(needed)
    model.graph.input.extend(i for i in graph.input if i.name == manifest.input.name)
    model.graph.output.extend(o for o in graph.output if o.name == manifest.logits_output)
    constants = {i.name: i for i in graph.initializer}
    for name in sorted(used):
        if name in params:
            model.graph.initializer.append(numpy_helper.from_array(params[name], name))
        elif name in constants:
            model.graph.initializer.append(constants[name])
    if manifest.output_activation:
        model = append_output_activation(model, manifest.output_activation)
    return model


def _needed_nodes(graph, output: str) -> list:
    producer = {out: node for node in graph.node for out in node.output}
    keep, todo, seen = set(), [output], set()
    while todo:
        name = todo.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        node = producer[name]
        keep.add(id(node))
        todo.extend(node.input)
    return [node for node in graph.node if id(node) in keep]

"""The registry: (domain, op_type) of every non-standard op we can lower -> its rule.

A rule takes a Builder for the node and emits standard-ONNX nodes that write the node's outputs.
"""

from __future__ import annotations

from collections.abc import Callable

from onnx_neq.graph.lowering.builder import Builder
from onnx_neq.graph.lowering.conv_grad import lower_conv_grad
from onnx_neq.graph.lowering.elementwise_grads import (
    lower_div_grad,
    lower_log_softmax_grad,
    lower_log_softmax_grad_13,
    lower_relu_grad,
    lower_scale,
    lower_sigmoid_grad,
    lower_softmax_grad,
    lower_softmax_grad_13,
)
from onnx_neq.graph.lowering.loss_grads import lower_sce_loss_grad
from onnx_neq.graph.lowering.norm_grads import lower_batch_norm_grad, lower_batch_norm_internal
from onnx_neq.graph.lowering.pool_grads import lower_average_pool_grad, lower_max_pool_grad
from onnx_neq.graph.lowering.structural import lower_concat_training, lower_split_training

Rule = Callable[[Builder], None]
MS = "com.microsoft"

RULES: dict[tuple[str, str], Rule] = {
    (MS, "ConvGrad"): lower_conv_grad,
    (MS, "ReluGrad"): lower_relu_grad,
    (MS, "SigmoidGrad"): lower_sigmoid_grad,
    (MS, "BatchNormInternal"): lower_batch_norm_internal,
    (MS, "BatchNormalizationGrad"): lower_batch_norm_grad,
    (MS, "SoftmaxCrossEntropyLossGrad"): lower_sce_loss_grad,
    (MS, "SoftmaxGrad_13"): lower_softmax_grad_13,
    (MS, "SoftmaxGrad"): lower_softmax_grad,
    (MS, "LogSoftmaxGrad_13"): lower_log_softmax_grad_13,
    (MS, "LogSoftmaxGrad"): lower_log_softmax_grad,
    (MS, "Scale"): lower_scale,
    (MS, "DivGrad"): lower_div_grad,
    (MS, "ConcatTraining"): lower_concat_training,
    (MS, "SplitTraining"): lower_split_training,
    ("", "MaxPoolGrad"): lower_max_pool_grad,  # ORT registers these two in the ONNX domain
    ("", "AveragePoolGrad"): lower_average_pool_grad,
}

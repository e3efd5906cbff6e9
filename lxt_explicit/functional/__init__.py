"""Explicit LRP operations: one :class:`torch.autograd.Function` per operation.

Every operation's forward pass returns exactly what the corresponding torch
operation returns.  Its backward pass receives the relevance of the output in
the gradient slot and returns the relevance of the inputs, so that after
``y.backward(y)`` the ``.grad`` of an input *is* its relevance.

Relevance flows into every input that requires a gradient; inputs that do not
(constants, frozen parameters, Python numbers) receive none.  Equation numbers
refer to Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance
Propagation for Transformers", ICML 2024.

Half-precision inputs are handled in float32 inside every backward pass (the
divisions and the sums over rows), and the relevance is returned in the
input's dtype, as autograd requires.

Where a backward pass is optimized (rows without relevance skipped, operands
reconstructed instead of stored, attention through torch's fused kernel or in
blocks), the equation is also written out plainly (:func:`linear_relevance`,
:func:`add_relevance`, :func:`attention_relevance`) and the tests compare the two.
"""

from .addmm import matmul_add, matmul_add_relevance
from .attention import attention_relevance, blocked_attention_relevance, mask_is_pure, scaled_dot_product_attention
from .elementwise import (
    NotElementWise,
    activation,
    add2,
    add_relevance,
    identity,
    is_gate,
    mul2,
    normalize,
    rms_norm_identity,
)
from .grouped import grouped_linear_epsilon, grouped_linear_relevance
from .linear import linear_epsilon, linear_relevance, matmul
from .normalization import group_norm, layer_norm
from .reduction import mean, sum_epsilon
from .softmax_op import masked_logits, softmax

__all__ = [
    "linear_epsilon",
    "softmax",
    "matmul",
    "add2",
    "mul2",
    "mean",
    "sum_epsilon",
    "layer_norm",
    "group_norm",
    "rms_norm_identity",
    "normalize",
    "identity",
    "activation",
    "scaled_dot_product_attention",
    "grouped_linear_epsilon",
    "is_gate",
    "masked_logits",
    "mask_is_pure",
    "linear_relevance",
    "add_relevance",
    "attention_relevance",
    "blocked_attention_relevance",
    "grouped_linear_relevance",
    "NotElementWise",
    "matmul_add",
    "matmul_add_relevance",
]

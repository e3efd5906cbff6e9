"""The torch functions a Composite routes: op groups, relevance-neutral functions, readable names.

Torch functions are grouped under op names (:data:`OP_GROUPS`): one key ``"add"`` covers
``torch.add``, ``Tensor.add``, ``a + b`` and ``1 + a``.  Functions that only move, copy or select
elements (:data:`RELEVANCE_NEUTRAL`) need no rule: their ordinary backward pass already moves
relevance correctly.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["OP_GROUPS", "RELEVANCE_NEUTRAL", "IN_PLACE", "OVERWRITING", "op_name", "argument"]

Tensor = torch.Tensor


def _existing(*candidates) -> tuple:
    return tuple(c for c in candidates if c is not None)


#: Op names and the torch functions each one covers (read-only).
OP_GROUPS: Mapping[str, tuple[Callable, ...]] = MappingProxyType({
    "linear": (F.linear, torch.addmm),
    "matmul": (torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, torch.mm,
               Tensor.mm),
    "add": (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__),
    "sub": (torch.sub, torch.subtract, Tensor.sub, Tensor.subtract, Tensor.__sub__, Tensor.__rsub__),
    "mul": (torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.__mul__, Tensor.__rmul__),
    "div": (torch.div, torch.divide, torch.true_divide, Tensor.div, Tensor.divide, Tensor.true_divide,
            Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__rdiv__),
    "neg": (torch.neg, torch.negative, Tensor.neg, Tensor.negative, Tensor.__neg__),
    "softmax": (F.softmax, torch.softmax, Tensor.softmax),
    "attention": (F.scaled_dot_product_attention,),
    "multi_head_attention": (F.multi_head_attention_forward,),
    "layer_norm": (F.layer_norm, F.group_norm),
    "rms_norm": _existing(getattr(F, "rms_norm", None)),
    "normalize": (F.normalize,),
    "mean": (torch.mean, Tensor.mean),
    "sum": (torch.sum, Tensor.sum),
    "activation": (
        F.silu, F.gelu, F.relu, torch.relu, Tensor.relu, F.tanh, torch.tanh, Tensor.tanh, F.sigmoid, torch.sigmoid,
        Tensor.sigmoid, F.elu, F.leaky_relu, F.relu6, F.hardtanh, F.softplus, F.mish, F.hardswish, F.hardsigmoid,
        F.selu, F.celu, torch.clamp, Tensor.clamp, torch.clip, Tensor.clip, torch.erf, Tensor.erf, torch.special.erf,
    ),
    "dropout": (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d),
    "conv": (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
    "avg_pool": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                 F.adaptive_avg_pool3d),
    "batch_norm": (F.batch_norm,),
    "pow": (torch.pow, Tensor.pow, Tensor.__pow__, torch.square, Tensor.square),
    "root": (torch.rsqrt, Tensor.rsqrt, torch.sqrt, Tensor.sqrt),
    "variance": (torch.var, Tensor.var, torch.std, Tensor.std, torch.var_mean, torch.std_mean),
    "norm": (torch.norm, Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm),
    "resample": (F.interpolate, F.fold),
    "matmul_add": (torch.baddbmm, Tensor.baddbmm, torch.addbmm, Tensor.addbmm, Tensor.addmm),
    "grouped_mm": _existing(getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)),
    "index_add": (torch.index_add, Tensor.index_add),
    "scatter_add": (torch.scatter_add, Tensor.scatter_add),
    "einsum": (torch.einsum,),
    "solve": (torch.linalg.solve, torch.linalg.solve_triangular),
})

#: In-place operations with the out-of-place function whose rule they get (read-only).  A
#: Composite computes the result out of place with that rule and copies it into the target, so
#: that the target's relevance flows through the rule.
IN_PLACE: Mapping[Callable, Callable] = MappingProxyType({
    Tensor.add_: torch.add, Tensor.__iadd__: torch.add, Tensor.sub_: torch.sub, Tensor.__isub__: torch.sub,
    Tensor.mul_: torch.mul, Tensor.__imul__: torch.mul, Tensor.div_: torch.div, Tensor.__itruediv__: torch.div,
    Tensor.index_add_: torch.index_add, Tensor.scatter_add_: torch.scatter_add, Tensor.neg_: torch.neg,
    Tensor.relu_: torch.relu, Tensor.sigmoid_: torch.sigmoid, Tensor.pow_: torch.pow, Tensor.__ipow__: torch.pow,
    Tensor.tanh_: torch.tanh, Tensor.clamp_: torch.clamp, Tensor.clip_: torch.clamp, torch.relu_: torch.relu,
    F.relu_: torch.relu, Tensor.baddbmm_: torch.baddbmm, Tensor.addbmm_: torch.addbmm, Tensor.addmm_: torch.addmm,
})

#: In-place operations that overwrite elements: relevance-neutral like their out-of-place forms,
#: but the tensors that rules saved before are copied first (copy on write).
OVERWRITING: frozenset = frozenset({
    Tensor.masked_fill_, Tensor.copy_, Tensor.fill_, Tensor.zero_, Tensor.index_copy_, Tensor.index_fill_,
    Tensor.scatter_, Tensor.masked_scatter_, Tensor.index_put_, Tensor.__setitem__,
})

#: Torch functions that only move, copy, select, cast or reshape elements.  Their
#: ordinary backward pass moves relevance correctly (it copies, permutes, sums over
#: fan-out, scatters back, or casts it), so they need no rule.
RELEVANCE_NEUTRAL: frozenset = frozenset(
    _existing(
        Tensor.view, Tensor.view_as, Tensor.reshape, Tensor.reshape_as, torch.reshape, Tensor.transpose,
        torch.transpose, Tensor.t, torch.t, Tensor.permute, torch.permute, Tensor.expand, Tensor.expand_as,
        torch.broadcast_to, Tensor.broadcast_to, Tensor.contiguous, Tensor.unsqueeze, torch.unsqueeze,
        Tensor.squeeze, torch.squeeze, Tensor.flatten, torch.flatten, Tensor.unflatten, torch.unflatten,
        torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack, Tensor.split,
        torch.split, Tensor.split_with_sizes, Tensor.chunk, torch.chunk, Tensor.unbind, torch.unbind,
        Tensor.tensor_split, torch.tensor_split, Tensor.narrow, torch.narrow, Tensor.select, torch.select,
        Tensor.__getitem__, Tensor.__setitem__, Tensor.index_select, torch.index_select, Tensor.gather,
        torch.gather, torch.take_along_dim, Tensor.to, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16,
        Tensor.type, Tensor.type_as, Tensor.cpu, Tensor.cuda, Tensor.clone, torch.clone, Tensor.detach,
        Tensor.masked_fill, Tensor.masked_fill_, torch.masked_fill, torch.where, Tensor.where, Tensor.repeat,
        Tensor.repeat_interleave, torch.repeat_interleave, torch.tile, Tensor.tile, Tensor.roll, torch.roll,
        Tensor.flip, torch.flip, Tensor.movedim, torch.movedim, Tensor.moveaxis, torch.moveaxis,
        Tensor.swapaxes, torch.swapaxes, Tensor.swapdims, torch.swapdims, F.pad, Tensor.tril, Tensor.triu,
        torch.tril, torch.triu, Tensor.unfold, Tensor.index_put, Tensor.index_put_, Tensor.scatter,
        torch.scatter, Tensor.masked_select, Tensor.requires_grad_, Tensor.__iter__, Tensor.T.__get__,
        Tensor.mT.__get__, Tensor.H.__get__, Tensor.mH.__get__, Tensor.real.__get__,
        # selections: relevance goes to the selected elements (top-k routing weights, sorted values)
        torch.topk, Tensor.topk, torch.sort, Tensor.sort, torch.view_as_real, torch.view_as_complex, F.unfold,
        Tensor.as_strided, torch.as_strided,
        # maxima and minima (also a row maximum subtracted from logits before a softmax: the epsilon rule
        # of the difference gives the maximum's share back to its element, so the softmax rule sees
        # the logits as if they were not shifted)
        torch.max, Tensor.max, torch.amax, Tensor.amax, torch.min, Tensor.min, torch.amin, Tensor.amin,
        # overwriting in place (see OVERWRITING): the source's relevance goes where it is written
        Tensor.copy_, Tensor.index_copy_, Tensor.index_fill_, Tensor.scatter_, Tensor.masked_scatter_, Tensor.fill_,
        Tensor.zero_,
        # max pooling passes relevance to the maximum, as its gradient does (the usual LRP convention)
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
    )
)


def op_name(func: Callable) -> str:
    """A readable name of a torch function, e.g. ``'torch.matmul'`` or ``'Tensor.add'``."""
    self_obj = getattr(func, "__self__", None)
    if self_obj is not None and type(self_obj).__name__ == "getset_descriptor":
        return f"Tensor.{self_obj.__name__}"
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    qualname = qualname.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")
    module = getattr(func, "__module__", None) or ""
    if qualname.startswith(("Tensor.", "torch.")):
        return qualname
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{qualname}"
    if module.startswith("torch"):
        return f"torch.{qualname}"
    return f"{module}.{qualname}" if module else qualname


def argument(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """The argument of a call at position ``index`` or keyword ``name``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)

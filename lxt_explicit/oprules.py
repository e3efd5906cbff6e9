"""Op rules: which LRP operation replaces a torch function on the relevance path.

A :class:`~lxt_explicit.composite.Composite` intercepts the torch functions that a
registered model calls (``F.linear``, ``torch.matmul``, ``Tensor.__add__``,
``F.softmax``, ...).  A call whose operands carry relevance (require a
gradient) is handed to the op rule registered for it, which calls the
matching operation of :mod:`lxt_explicit.functional`.

Torch functions are grouped under op names (:data:`OP_GROUPS`): one key
``"add"`` covers ``torch.add``, ``Tensor.add``, ``a + b`` and ``1 + a``.
Functions that only move, copy or select elements (:data:`RELEVANCE_NEUTRAL`)
need no rule: their ordinary backward pass already moves relevance correctly.

An op rule is called as ``rule(func, args, kwargs)`` and returns the output, or
:data:`NotImplemented` for a call it does not cover (the Composite then
reports the call as unhandled).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import functional as lf
from .rules import EpsilonRule, UniformEpsilonRule
from .stabilizer import DEFAULT_EPSILON

__all__ = [
    "OpRule",
    "LinearEpsilon",
    "MatmulEpsilon",
    "AddEpsilon",
    "MulUniform",
    "DivByConstant",
    "SoftmaxTaylor",
    "AttentionRule",
    "MultiheadAttentionRule",
    "LayerNormRule",
    "DropoutRule",
    "ReduceEpsilon",
    "ElementwiseIdentity",
    "GenericEpsilon",
    "StopRelevance",
    "PlainGradient",
    "OP_GROUPS",
    "RELEVANCE_NEUTRAL",
    "op_name",
]

Tensor = torch.Tensor


def _relevant(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class OpRule:
    """Base class of op rules: ``rule(func, args, kwargs) -> output`` or ``NotImplemented``."""

    def __call__(self, func: Callable, args: tuple, kwargs: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def _options(self) -> dict:
        return {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"


class _EpsilonOption(OpRule):
    def __init__(self, *, epsilon: float = DEFAULT_EPSILON):
        if epsilon < 0:
            raise ValueError(f"epsilon must be non-negative, got {epsilon}")
        self.epsilon = float(epsilon)

    def _options(self):
        return {"epsilon": self.epsilon}


class GenericEpsilon(_EpsilonOption):
    """Epsilon rule by a vector-Jacobian product for any linear op (convolutions, ``addmm`` with options, ...).

    Relevance-carrying tensor arguments share the relevance uniformly when there
    are several (bilinear ops, Proposition 3.3), else one gets all of it.
    """

    def __call__(self, func, args, kwargs):
        count = sum(_relevant(a) for a in args)
        if count == 0 or any(_relevant(v) for v in kwargs.values()):
            return NotImplemented
        rule = EpsilonRule(epsilon=self.epsilon) if count == 1 else UniformEpsilonRule(epsilon=self.epsilon)
        return rule(func, *args, **kwargs)


class LinearEpsilon(_EpsilonOption):
    """Epsilon rule for ``F.linear`` and ``torch.addmm`` (GPT-2's ``Conv1D``), Eq. 8."""

    def __call__(self, func, args, kwargs):
        if func is torch.addmm:
            bias, x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"), _arg(args, kwargs, 2, "mat2")
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or _relevant(bias) or _relevant(weight):
                return GenericEpsilon(epsilon=self.epsilon)(func, args, kwargs)
            return lf._LinearEpsilon.apply(x, weight.t(), bias, self.epsilon)
        x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        if _relevant(weight) or _relevant(bias):
            return GenericEpsilon(epsilon=self.epsilon)(func, args, kwargs)
        return lf.linear_epsilon(x, weight, bias, epsilon=self.epsilon)


class MatmulEpsilon(_EpsilonOption):
    """Epsilon rule then uniform rule for ``torch.matmul``, ``bmm``, ``mm`` and ``@`` (Proposition 3.3)."""

    def __call__(self, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return NotImplemented
        a, b = args
        if func is Tensor.__rmatmul__:
            a, b = b, a
        if not isinstance(a, Tensor) or not isinstance(b, Tensor):
            return NotImplemented
        return lf.matmul(a, b, epsilon=self.epsilon)


def _binary_operands(func, args, kwargs, reflected):
    if len(args) != 2 or any(k != "alpha" for k in kwargs):
        return None
    a, b = args
    return (b, a) if func in reflected else (a, b)


class AddEpsilon(_EpsilonOption):
    """Epsilon rule for sums and differences (``+``, ``-``, ``torch.add``, ``torch.sub``), see :func:`~lxt_explicit.functional.add2`."""

    _SUB = frozenset({torch.sub, torch.subtract, Tensor.sub, Tensor.__sub__, Tensor.__rsub__, Tensor.subtract})
    _REFLECTED = frozenset({Tensor.__rsub__, Tensor.__radd__})

    def __call__(self, func, args, kwargs):
        operands = _binary_operands(func, args, kwargs, self._REFLECTED)
        if operands is None:
            return NotImplemented
        if kwargs.get("alpha", 1) != 1:
            return GenericEpsilon(epsilon=self.epsilon)(func, args, kwargs)
        a, b = operands
        if func in self._SUB:
            b = lf.identity(torch.neg, b) if _relevant(b) else -b
        return lf.add2(a, b, epsilon=self.epsilon)


class MulUniform(OpRule):
    """Uniform rule for element-wise products; a constant factor passes all relevance on (Proposition 3.2)."""

    def __call__(self, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return NotImplemented
        return lf.mul2(*args)


class DivByConstant(OpRule):
    """Division by a constant passes relevance unchanged; a relevance-carrying divisor is not covered."""

    _REFLECTED = frozenset({Tensor.__rtruediv__, Tensor.__rdiv__})

    def __call__(self, func, args, kwargs):
        if func in self._REFLECTED or len(args) != 2 or _relevant(args[1]) or kwargs.get("rounding_mode") is not None:
            return NotImplemented
        divisor = args[1]
        return lf.identity(lambda t: func(t, divisor, **kwargs), args[0])


class ElementwiseIdentity(OpRule):
    """Identity rule (AttnLRP Eq. 9) for an element-wise op of one relevance-carrying tensor, its first argument.

    The rule of activations (SiLU, GELU, tanh, ...), negation, dropout while
    training, ``F.rms_norm`` and ``F.normalize`` (Proposition 3.4).
    """

    def __call__(self, func, args, kwargs):
        if not args or not _relevant(args[0]) or any(_relevant(a) for a in args[1:]) or any(
            _relevant(v) for v in kwargs.values()
        ):
            return NotImplemented
        rest = args[1:]
        return lf.identity(lambda t: func(t, *rest, **kwargs), args[0])


class SoftmaxTaylor(OpRule):
    """Deep-Taylor rule with bias for the softmax (Proposition 3.1)."""

    def __call__(self, func, args, kwargs):
        x = _arg(args, kwargs, 0, "input")
        dim = _arg(args, kwargs, 1, "dim")
        if func is F.softmax:
            dtype = _arg(args, kwargs, 3, "dtype")
        else:
            dtype = _arg(args, kwargs, 2, "dtype")
        if dim is None:
            raise ValueError("lxt_explicit: F.softmax was called without `dim`; pass the dimension explicitly")
        return lf.softmax(x, dim, dtype=dtype)


class AttentionRule(_EpsilonOption):
    """AttnLRP (or, with ``cp=True``, CP-LRP) rules for ``F.scaled_dot_product_attention``.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominators.
    cp : bool, optional
        No relevance through the attention weights (CP-LRP).
    """

    def __init__(self, *, epsilon: float = DEFAULT_EPSILON, cp: bool = False):
        super().__init__(epsilon=epsilon)
        self.cp = bool(cp)

    def _options(self):
        return {"epsilon": self.epsilon, "cp": self.cp}

    def __call__(self, func, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        defaults = (None, None, None, None, 0.0, False, None, False)
        values = {n: _arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}
        if values["dropout_p"]:
            raise RuntimeError(
                f"lxt_explicit: scaled_dot_product_attention was called with dropout_p={values['dropout_p']}; "
                "attention dropout makes relevance random. Call model.eval() or set the attention dropout to 0."
            )
        return lf.scaled_dot_product_attention(
            values["query"],
            values["key"],
            values["value"],
            attn_mask=values["attn_mask"],
            is_causal=values["is_causal"],
            scale=values["scale"],
            enable_gqa=values["enable_gqa"],
            epsilon=self.epsilon,
            cp=self.cp,
        )


class MultiheadAttentionRule(AttentionRule):
    """AttnLRP / CP-LRP for ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, torchvision's ViT).

    The function's standard path is replayed with the library's operations: epsilon rule on the
    input and output projections, :class:`AttentionRule` on the attention itself.  Calls with
    ``bias_k``/``bias_v``, ``add_zero_attn``, static keys/values or active dropout are not covered
    (they are reported as unhandled).  Returned attention weights, if requested, carry no relevance.
    """

    _SIGNATURE = inspect.signature(F.multi_head_attention_forward)

    def __call__(self, func, args, kwargs):
        p = self._SIGNATURE.bind(*args, **kwargs)
        p.apply_defaults()
        a = p.arguments
        if (
            a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]
            or a["static_k"] is not None or a["static_v"] is not None or (a["training"] and a["dropout_p"] > 0)
        ):
            return NotImplemented
        query, key, value = a["query"], a["key"], a["value"]
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        tgt_len, bsz, embed_dim = query.shape
        heads = a["num_heads"]
        head_dim = embed_dim // heads
        q, k, v = self._project(query, key, value, a, embed_dim)
        attn_mask = self._merged_mask(a, query.dtype, bsz, heads, tgt_len, key.shape[0], batched)
        is_causal = bool(a["is_causal"]) and attn_mask is None
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, tgt_len, head_dim)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, -1, head_dim)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1).view(bsz, heads, -1, head_dim)
        out = lf.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              epsilon=self.epsilon, cp=self.cp)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        out = lf.linear_epsilon(out, a["out_proj_weight"], a["out_proj_bias"], epsilon=self.epsilon)
        out = out.view(tgt_len, bsz, embed_dim)
        weights = None
        if a["need_weights"]:
            with torch.no_grad():
                scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
                if attn_mask is not None:
                    scores = scores + attn_mask
                weights = torch.softmax(scores, -1)
                weights = weights.mean(1) if a["average_attn_weights"] else weights
                weights = weights if batched else weights.squeeze(0)
        return (out if batched else out.squeeze(1)), weights

    def _project(self, query, key, value, a, embed_dim):
        linear = lambda x, w, b: lf.linear_epsilon(x, w, b, epsilon=self.epsilon)  # noqa: E731
        if a["use_separate_proj_weight"]:
            biases = a["in_proj_bias"].chunk(3) if a["in_proj_bias"] is not None else (None, None, None)
            weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
            return tuple(linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
        weight, bias = a["in_proj_weight"], a["in_proj_bias"]
        if key is value and query is key:
            packed = linear(query, weight, bias).unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2)
            packed = packed.squeeze(-2).contiguous()
            return packed[0], packed[1], packed[2]
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)

    @staticmethod
    def _merged_mask(a, dtype, bsz, heads, tgt_len, src_len, batched):
        def additive(mask):
            if mask is None or mask.dtype != torch.bool:
                return mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))

        attn_mask = additive(a["attn_mask"])
        padding = additive(a["key_padding_mask"])
        if padding is not None and not batched:
            padding = padding.unsqueeze(0)
        if attn_mask is not None:
            attn_mask = attn_mask.view(1, 1, tgt_len, src_len) if attn_mask.dim() == 2 else attn_mask.view(
                bsz, heads, tgt_len, src_len
            )
        if padding is not None:
            padding = padding.view(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        return attn_mask


class LayerNormRule(_EpsilonOption):
    """Rules of :func:`~lxt_explicit.functional.layer_norm` for ``F.layer_norm``."""

    def __call__(self, func, args, kwargs):
        x = _arg(args, kwargs, 0, "input")
        shape = _arg(args, kwargs, 1, "normalized_shape")
        weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        eps = _arg(args, kwargs, 4, "eps", 1e-5)
        return lf.layer_norm(x, weight, bias, eps, normalized_shape=tuple(shape), epsilon=self.epsilon)


class ReduceEpsilon(_EpsilonOption):
    """Epsilon rule for ``mean`` and ``sum`` over dimensions."""

    _MEAN = frozenset({torch.mean, Tensor.mean})

    def __call__(self, func, args, kwargs):
        x = args[0]
        dim = _arg(args, kwargs, 1, "dim")
        keepdim = _arg(args, kwargs, 2, "keepdim", False)
        dtype = kwargs.get("dtype")
        if dtype is not None:
            x = x.to(dtype)
        if isinstance(dim, list):
            dim = tuple(dim)
        if func in self._MEAN:
            return lf.mean(x, dim, keepdim, epsilon=self.epsilon)
        return lf.sum_epsilon(x, dim, keepdim, epsilon=self.epsilon)


class DropoutRule(OpRule):
    """Dropout while training passes relevance to the kept units (identity rule); in eval mode it is neutral."""

    def __call__(self, func, args, kwargs):
        p = _arg(args, kwargs, 1, "p", 0.5)
        training = _arg(args, kwargs, 2, "training", True)
        if not training or p == 0:
            return func(*args, **kwargs)
        return ElementwiseIdentity()(func, args, kwargs)


class StopRelevance(OpRule):
    """The op's output is treated as a constant (CP-LRP's rule for attention weights)."""

    def __call__(self, func, args, kwargs):
        output = func(*args, **kwargs)
        return output.detach() if isinstance(output, Tensor) else output


class PlainGradient(OpRule):
    """Leave the op to autograd on purpose: its ordinary backward pass moves the relevance."""

    def __call__(self, func, args, kwargs):
        return func(*args, **kwargs)


def _existing(*candidates) -> tuple:
    return tuple(c for c in candidates if c is not None)


#: Op names and the torch functions each one covers.
OP_GROUPS: dict[str, tuple[Callable, ...]] = {
    "linear": (F.linear, torch.addmm),
    "matmul": (torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, torch.mm, Tensor.mm),
    "add": (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__),
    "sub": (torch.sub, torch.subtract, Tensor.sub, Tensor.subtract, Tensor.__sub__, Tensor.__rsub__),
    "mul": (torch.mul, torch.multiply, Tensor.mul, Tensor.multiply, Tensor.__mul__, Tensor.__rmul__),
    "div": (torch.div, torch.divide, torch.true_divide, Tensor.div, Tensor.divide, Tensor.true_divide,
            Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__rdiv__),
    "neg": (torch.neg, torch.negative, Tensor.neg, Tensor.negative, Tensor.__neg__),
    "softmax": (F.softmax, torch.softmax, Tensor.softmax),
    "attention": (F.scaled_dot_product_attention,),
    "multi_head_attention": (F.multi_head_attention_forward,),
    "layer_norm": (F.layer_norm,),
    "rms_norm": _existing(getattr(F, "rms_norm", None)),
    "normalize": (F.normalize,),
    "mean": (torch.mean, Tensor.mean),
    "sum": (torch.sum, Tensor.sum),
    "activation": (
        F.silu, F.gelu, F.relu, torch.relu, Tensor.relu, F.tanh, torch.tanh, Tensor.tanh, F.sigmoid, torch.sigmoid,
        Tensor.sigmoid, F.elu, F.leaky_relu, F.relu6, F.hardtanh, F.softplus, F.mish, F.hardswish, F.hardsigmoid,
        F.selu, F.celu, torch.clamp, Tensor.clamp, torch.clip, Tensor.clip,
    ),
    "dropout": (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d),
    "conv": (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
    "avg_pool": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                 F.adaptive_avg_pool3d),
    "batch_norm": (F.batch_norm,),
}

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

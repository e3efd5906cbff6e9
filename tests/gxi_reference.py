"""An independent Gradient x Input formulation of the AttnLRP / CP-LRP rules (Arras et al. 2025).

This is the second formulation the explicit rules are checked against.  It shares no code
with the library: the model runs unmodified, only the *gradient* of a few operations is
changed, and relevance is ``input * gradient``:

* linear maps, sums, constant factors, masks: the plain gradient (epsilon rule with epsilon -> 0);
* element-wise activations and RMS/normalizations (identity rule): gradient ``f(x) / x``;
* layer norm: the standard deviation is detached (identity on the division, linear centering);
* products and matrix products of two relevance-carrying operands (uniform rule): half the gradient;
  CP-LRP: a factor that an activation produced (the gate of a gated MLP) is detached instead;
* softmax (AttnLRP): the plain gradient, which *is* the deep-Taylor rule with bias;
  CP-LRP: the attention weights are detached;
  AttnLRP with ``sinks=t``: in scaled dot-product attention, the rows of attention weights whose
  weight on the first key that the last query attends to exceeds ``t`` are detached, and their
  product with the values keeps its full gradient (the other rows: as AttnLRP); ``sinks='mix'``:
  each row is the blend ``m * (detached weights) @ v + (1 - m) * AttnLRP's product``, ``m`` its
  (constant) weight on that key; ``sinks='gate'``: ``m * v_z`` (``z`` that key) is a constant and the
  rest is ``(1 - m)`` (constant) times AttnLRP's product of the softmax over the other keys with the values;
* normalizers (a divisor, a root, a variance, a norm) are detached;
  powers get the identity rule (gradient ``f(x) / x``);
* mixture of experts: top-k selection and index_add_ keep the plain gradient (selection, sum);
  CP-LRP: the routers' outputs are detached;
* state-space and linear-attention scans (MambaLRP): the scan functions of transformers'
  modeling files are called with their parameter arguments detached (:data:`SCAN_PARAMETERS`), so
  the scan is a linear map of its input and the plain gradient is the epsilon rule.
* ``baddbmm`` (BLOOM's scores with their ALiBi bias): the bias is a constant summand (plain gradient),
  the product of two relevance-carrying batches gets half the gradient; an ``einsum`` of ``N``
  relevance-carrying operands gets ``1/N`` of the gradient;
* T5's relative attention biases (embeddings named ``*relative_attention_bias``) are constants, not
  inputs; an embedding module called twice gives two inputs (``name`` and ``name#1``).
"""

from __future__ import annotations

import inspect
import math
import sys
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _half_gradient(out):
    return 0.5 * out + 0.5 * out.detach()


def _shared_gradient(out, count):
    """Forward value ``out``, ``1 / count`` of its gradient."""
    return out / count + out.detach() * (1 - 1 / count)


def _with_gradient_ratio(x, y):
    """Forward value ``y``, gradient ``y / x`` with respect to ``x`` (identity rule in GxI form)."""
    defined = torch.isfinite(x) & (x != 0)  # masked (infinite) and zero inputs pass no gradient
    ratio = torch.where(defined, y / x, torch.zeros_like(y)).detach()
    x = torch.where(defined, x, torch.zeros_like(x))
    return y.detach() + (x * ratio - (x * ratio).detach())


def _detached(output):
    if isinstance(output, tuple):
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
    return output.detach()


def _rg(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


class GxIMode(TorchFunctionMode):
    """Gradient modifications for the functional ops of transformers models."""

    ACTIVATIONS = {F.silu, F.gelu, F.relu, torch.tanh, torch.Tensor.tanh, torch.sigmoid, F.tanh, F.sigmoid,
                   torch.Tensor.sigmoid, torch.clamp, torch.Tensor.clamp}
    DIVISIONS = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.div_, torch.Tensor.__itruediv__}
    NORMALIZERS = {torch.rsqrt, torch.Tensor.rsqrt, torch.sqrt, torch.Tensor.sqrt, torch.var, torch.Tensor.var,
                   torch.norm, torch.linalg.vector_norm}
    POWERS = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.square}

    def __init__(self, cp: bool, gates: dict, constant_gates: bool = True, sinks: float | None = None):
        super().__init__()
        self.cp = cp
        self.sinks = sinks
        self.constant_gates = constant_gates
        self.gates = gates  # id -> tensor: outputs of activations (kept alive, so ids stay unique)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func in (torch.matmul, torch.Tensor.matmul, torch.bmm) and _rg(args[0]) and _rg(args[1]):
            return _half_gradient(func(*args, **kwargs))
        if func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__) and _rg(args[0]) and _rg(args[1]):
            gate = [id(a) in self.gates and self.gates[id(a)] is a for a in args[:2]]
            if self.cp and self.constant_gates and gate[0] != gate[1]:  # CP-LRP: the gate is a constant factor
                a, b = (t.detach() if g else t for t, g in zip(args[:2], gate))
                return func(a, b)
            return _half_gradient(func(*args, **kwargs))
        if func in (F.softmax, torch.softmax, torch.Tensor.softmax) and self.cp:
            return func(*args, **kwargs).detach()
        if func in self.DIVISIONS and len(args) == 2 and _rg(args[1]):
            return func(args[0], args[1].detach(), **kwargs)
        if func in self.NORMALIZERS:
            out = func(*args, **kwargs)
            return type(out)([o.detach() for o in out]) if isinstance(out, tuple) else out.detach()
        if func in self.POWERS and _rg(args[0]) and (len(args) < 2 or not _rg(args[1])):
            return _with_gradient_ratio(args[0], func(*args, **kwargs))
        if func in self.ACTIVATIONS and _rg(args[0]):
            out = _with_gradient_ratio(args[0], func(*args, **kwargs))
            self.gates[id(out)] = out
            return out
        if func is F.layer_norm and _rg(args[0]):
            x, shape = args[0], args[1]
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            bias = args[3] if len(args) > 3 else kwargs.get("bias")
            eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
            dims = tuple(range(-len(shape), 0))
            centered = x - x.mean(dims, keepdim=True)
            std = (centered.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
            y = centered / std
            if weight is not None:
                y = y * weight
            if bias is not None:
                y = y + bias
            exact = func(*args, **kwargs)
            return exact.detach() + (y - y.detach())
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func in (torch.baddbmm, torch.Tensor.baddbmm):
            return self._baddbmm(*args, **kwargs)
        if func is torch.einsum and sum(_rg(a) for a in args[1:]) > 1:
            return _shared_gradient(func(*args, **kwargs), sum(_rg(a) for a in args[1:]))
        return func(*args, **kwargs)

    @staticmethod
    def _baddbmm(bias, batch1, batch2, beta=1.0, alpha=1.0):
        exact = torch.baddbmm(bias, batch1, batch2, beta=beta, alpha=alpha)
        product = torch.bmm(batch1, batch2)
        if _rg(batch1) and _rg(batch2):
            product = _half_gradient(product)
        y = beta * bias + alpha * product
        return exact.detach() + (y - y.detach())

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        exact = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
        groups = q.shape[-3] // k.shape[-3]
        if groups > 1:
            k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = torch.matmul(q, k.transpose(-1, -2))
        if _rg(q) and _rg(k):
            scores = _half_gradient(scores)
        scores = scores * scale
        L, S = q.shape[-2], k.shape[-2]
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attn_mask
        if is_causal:
            keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, -1)
        if self.cp:
            weights = weights.detach()
        if self.sinks is not None and not self.cp:
            return exact.detach() + self._sink_rows_product(weights, v)
        out = torch.matmul(weights, v)
        if _rg(weights) and _rg(v):
            out = _half_gradient(out)
        return exact.detach() + (out - out.detach())

    def _sink_rows_product(self, weights, v):
        """``weights @ v`` (gradient part only) with the sink rows' weights constant."""
        sink = (weights[..., -1:, :] > 0).to(torch.int8).argmax(-1, keepdim=True)  # first key the last row sees
        mass = torch.take_along_dim(weights, sink.expand(*weights.shape[:-1], 1), -1)
        if self.sinks == "gate":  # o = m v_z + (1 - m) softmax(scores without z) v: m constant, m v_z a bias
            column = torch.zeros_like(weights[..., :1, :]).scatter_(-1, sink, 1.0) > 0
            gate = (1 - mass).detach()
            others = weights.masked_fill(column, 0.0)
            total = others.sum(-1, keepdim=True)
            rest = others / total.clamp(min=torch.finfo(total.dtype).tiny)  # the softmax without z, and its gradient
            product = torch.matmul(rest, v)
            product = _half_gradient(product) if _rg(v) and _rg(rest) else product
            gated = gate * product
            return gated - gated.detach()
        if self.sinks == "mix":  # a blend of the two formulations, by the weight on the sink
            share = mass.detach()
            constant_rows = torch.matmul(weights.detach(), v)
            softmax_rows = _half_gradient(torch.matmul(weights, v)) if _rg(v) else torch.matmul(weights, v)
            mixed = share * constant_rows + (1 - share) * softmax_rows
            return mixed - mixed.detach()
        rows = (mass > self.sinks).detach()
        constant = torch.where(rows, weights.detach(), weights)
        out = torch.matmul(constant, v)
        mixed = torch.where(rows, out, _half_gradient(out)) if _rg(v) else out
        return mixed - mixed.detach()


def _is_activation_module(module: nn.Module) -> bool:
    return type(module).__module__ == "transformers.activations" or type(module).__name__ == "BloomGelu" or isinstance(
        module, (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid)
    )


def _is_identity_module(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") or _is_activation_module(module)


#: transformers' scan functions (by name, in every modeling file that defines one) and their arguments
#: that are input-dependent parameters of the scan: the step size, A and the B/C projections of
#: Mamba's selective scan; the queries, keys, decay and write strength of gated delta rules.
SCAN_PARAMETERS = {
    "mamba_selective_scan": ("dt", "A", "B", "C"),
    "mamba2_chunk_scan": ("dt", "A", "B", "C"),
    "torch_chunk_gated_delta_rule": ("query", "key", "g", "beta"),
    "chunk_kimi_delta_attention": ("query", "key", "g", "beta"),
}


def _with_constant(function, names):
    signature = inspect.signature(function)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for name in names:
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor):
                bound.arguments[name] = value.detach()
        return function(*bound.args, **bound.kwargs)

    return call


@contextmanager
def constant_scan_parameters(model: nn.Module):
    """Inside the block, the scan functions of ``model``'s modeling files get their parameters detached."""
    modeling_files = {sys.modules[type(m).__module__] for m in model.modules()}
    patched = []
    try:
        for modeling in modeling_files:
            for name, names in SCAN_PARAMETERS.items():
                function = getattr(modeling, name, None)
                if function is not None:
                    patched.append((modeling, name, function))
                    setattr(modeling, name, _with_constant(function, names))
        yield
    finally:
        for modeling, name, function in patched:
            setattr(modeling, name, function)


def gxi_relevance(model: nn.Module, run, *, cp: bool = False, constant_gates: bool = True, leaf_inputs=(),
                  sinks: float | None = None):
    """Relevance of every embedding output (and of ``leaf_inputs``) by Gradient x Input.

    Parameters
    ----------
    model : nn.Module
        The unmodified model.
    run : callable
        ``run(model) -> target`` runs the model and returns the scalar (or summed) quantity to explain.
    cp : bool
        CP-LRP instead of AttnLRP.
    constant_gates : bool
        With ``cp``: the outputs of activations are constant factors of products (the reference
        definition of CP-LRP); else products of two relevance-carrying factors split uniformly.
    leaf_inputs : sequence of (name, tensor)
        Inputs that require a gradient, passed to the model by ``run``.
    sinks : float, optional
        AttnLRP with sink rows of scaled dot-product attention as constants (``attnlrp(sinks=...)``).

    Returns
    -------
    dict
        name -> relevance (input * gradient, same shape as the input).
    """
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved_grad:
        p.requires_grad_(False)
    leaves: dict[str, torch.Tensor] = {}
    gates: dict[int, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if cp and type(module).__name__.endswith("Router"):  # CP-LRP: routing weights are constants
            handles.append(module.register_forward_hook(lambda mod, args, output: _detached(output)))
        elif isinstance(module, nn.Embedding) and not name.endswith("relative_attention_bias"):

            def to_leaf(mod, args, output, name=name):
                output = output.detach().requires_grad_()
                key, count = name, 1
                while key in leaves:  # a module called twice (an embedding shared by encoder and decoder)
                    key, count = f"{name}#{count}", count + 1
                leaves[key] = output
                return output

            handles.append(module.register_forward_hook(to_leaf))
        elif _is_identity_module(module):

            def identity(mod, args, output):
                if not _rg(args[0]):
                    return output
                output = _with_gradient_ratio(args[0], output)
                if _is_activation_module(mod):
                    gates[id(output)] = output
                return output

            handles.append(module.register_forward_hook(identity))
    try:
        with GxIMode(cp, gates, constant_gates, sinks), constant_scan_parameters(model):
            target = run(model)
        target.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_grad:
            p.requires_grad_(flag)
    result = {name: (t * t.grad).detach() for name, t in leaves.items() if t.grad is not None}
    for name, t in leaf_inputs:
        result[name] = (t * t.grad).detach()
    return result

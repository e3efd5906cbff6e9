"""The generic path of the rules: any callable inside one autograd node, relevance from its Jacobian.

:class:`NodeRule` runs ``fn`` inside one autograd node; its backward pass asks the rule for the
relevance of the inputs.  The rules that need the local Jacobian (epsilon, uniform-epsilon,
Taylor) compute it as a vector-Jacobian product of ``fn`` at its inputs, so they apply to any
differentiable function.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from ..stabilizer import stabilized_quotient
from .base import Rule, RuleDeclined, describe

__all__ = [
    "NodeRule", "same_kind", "output_tensors", "input_values", "output_values", "input_times_vjp",
    "normalized_relevance",
]


def same_kind(output: tuple, items) -> tuple:
    """``items`` as a tuple of the type of ``output`` (tuple, named tuple or torch's ``return_types``)."""
    if type(output) is tuple:
        return tuple(items)
    try:
        return type(output)(tuple(items))  # torch.return_types (structseq) take one sequence
    except TypeError:
        return type(output)(*items)  # named tuples take the fields


def output_tensors(output: Any, fn: Callable) -> tuple[tuple, bool]:
    """Return the outputs as a tuple and whether ``fn`` returned a tuple."""
    if isinstance(output, torch.Tensor):
        return (output,), False
    if isinstance(output, tuple) and any(isinstance(o, torch.Tensor) for o in output):
        return output, True
    raise TypeError(
        f"a rule can wrap only callables that return a tensor or a tuple of tensors; {describe(fn)} returned "
        f"{type(output).__name__}. Wrap the submodules that compute tensors instead, or give this module no rule."
    )


class _RuleFunction(Function):
    """Autograd node of a rule: plain forward, the rule's relevance in the backward pass."""

    @staticmethod
    def forward(ctx, rule, fn, kwargs, kind, *args):
        needs = ctx.needs_input_grad[4:]
        if rule.needs_graph:
            inputs = tuple(
                a.detach().requires_grad_() if isinstance(a, torch.Tensor) and need else a
                for a, need in zip(args, needs)
            )
            with torch.enable_grad():
                output = fn(*inputs, **kwargs)
        else:
            inputs = args
            output = fn(*args, **kwargs)
        outputs, is_tuple = output_tensors(output, fn)
        kind.append(output)  # the caller rebuilds a named tuple of this type
        ctx.rule, ctx.needs = rule, needs
        ctx.input_meta = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else None for a in args)
        ctx.output_meta = tuple((o.shape, o.dtype) if isinstance(o, torch.Tensor) else None for o in outputs)
        rule.record(ctx, fn, inputs, kwargs, outputs)
        detached = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
        if rule.needs_graph:  # the values of inputs and outputs, protected from later in-place changes
            relevant = [a.detach() for a, need in zip(inputs, needs) if isinstance(a, torch.Tensor) and need]
            ctx.save_for_backward(*relevant, *(o for o in detached if isinstance(o, torch.Tensor)))
        return detached if is_tuple else detached[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, *out_relevance):
        relevance = ctx.rule.relevance(ctx, out_relevance)
        return (None, None, None, None) + tuple(relevance)


class NodeRule(Rule):
    """A rule whose generic path runs ``fn`` in one autograd node (see :meth:`relevance`).

    Subclasses set ``needs_graph`` when the backward pass needs the local Jacobian (the node
    then keeps the graph of ``fn`` at its inputs), may override :meth:`record` to keep what the
    backward pass needs, and implement :meth:`relevance`.
    """

    needs_graph: bool = False

    def explain_call(self, fn, args, kwargs):
        return self.node(fn, args, kwargs)

    def node(self, fn: Callable, args: tuple, kwargs: dict):
        """Run ``fn`` in one autograd node whose backward pass is :meth:`relevance`."""
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in kwargs.values()):
            raise RuleDeclined(f"{self!r} gives relevance to positional arguments only; a keyword argument of "
                               f"{describe(fn)} carries relevance")
        kind: list = []
        result = _RuleFunction.apply(self, fn, kwargs, kind, *args)
        return same_kind(kind[0], result) if isinstance(result, tuple) else result

    def record(self, ctx, fn, inputs, kwargs, outputs) -> None:
        """Keep what the backward pass needs on ``ctx`` (the graph at the inputs, if ``needs_graph``)."""
        if self.needs_graph:
            ctx.inputs, ctx.outputs = inputs, outputs

    def relevance(self, ctx, out_relevance) -> list:  # pragma: no cover - abstract
        """Relevance of every positional input (``None`` for those without) from that of the outputs."""
        raise NotImplementedError


def input_values(ctx) -> list:
    """The values of the relevance-carrying inputs as saved in the forward pass (``None`` for the others)."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) if need else None for need in ctx.needs]


def output_values(ctx) -> list:
    """The values of the node's outputs as saved in the forward pass (``None`` for non-tensor outputs)."""
    saved = iter(ctx.saved_tensors[sum(ctx.needs):])
    return [next(saved) if isinstance(o, torch.Tensor) else None for o in ctx.outputs]


def normalized_relevance(ctx, out_relevance, denominators, epsilon):
    """The outputs that received relevance and ``R / stab(denominator)`` for each."""
    outputs, normalized = [], []
    for output, relevance, denominator in zip(ctx.outputs, out_relevance, denominators):
        if isinstance(output, torch.Tensor) and relevance is not None and output.requires_grad:
            outputs.append(output)
            normalized.append(stabilized_quotient(relevance, denominator, epsilon))
    return outputs, normalized


def input_times_vjp(ctx, outputs, normalized, factors, scale=1.0):
    """``factor_i * (J^T normalized)_i * scale`` for every relevance-carrying input."""
    indices = [i for i, need in enumerate(ctx.needs) if need]
    result = [None] * len(ctx.needs)
    if not outputs:
        return result
    grads = torch.autograd.grad(outputs, [ctx.inputs[i] for i in indices], normalized, allow_unused=True)
    for i, grad in zip(indices, grads):
        if grad is not None:
            result[i] = (factors[i] * grad * scale).to(ctx.input_meta[i][1])
    return result

"""Rules that end or start the relevance path, or leave a call to autograd on purpose."""

from __future__ import annotations

import torch

from .base import Rule, RuleDeclined, carries_relevance, describe
from .graph import output_tensors, same_kind

__all__ = ["StopRelevanceRule", "PlainGradientRule", "RelevanceSource"]


class StopRelevanceRule(Rule):
    """Stop relevance: the output is returned detached, as a constant.

    Downstream rules see a constant (a product with it passes all relevance to
    the other factor) and no relevance reaches the inputs.  This is how CP-LRP
    treats attention weights.
    """

    def explain_call(self, fn, args, kwargs):
        output = fn(*args, **kwargs)
        if isinstance(output, torch.Tensor):
            return output.detach()
        outputs, _ = output_tensors(output, fn)
        return same_kind(output, (o.detach() if isinstance(o, torch.Tensor) else o for o in outputs))


class PlainGradientRule(Rule):
    """Leave the call to autograd on purpose: its ordinary backward pass moves the relevance.

    For operations whose gradient is the wanted rule (Zennit alone passes the whole relevance
    to both summands of a residual sum, for example).
    """

    def explain_call(self, fn, args, kwargs):
        return fn(*args, **kwargs)


class RelevanceSource(Rule):
    """Mark a module's output as an input of the explanation.

    The output is returned as a new leaf tensor that requires a gradient, so
    relevance is collected there: after the backward pass
    :meth:`~lxt_explicit.composite.Composite.source_relevance` returns it.
    Embedding layers are the usual sources: token, position and token-type embeddings.

    Parameters
    ----------
    constant_inputs_only : bool, optional
        Decline modules whose inputs carry relevance (then the module runs as if it had no rule):
        for modules chosen by name, such as sinusoidal position embeddings, that might add their
        embedding to the hidden states themselves.
    """

    is_source = True

    def __init__(self, *, constant_inputs_only: bool = False):
        self.constant_inputs_only = bool(constant_inputs_only)

    def options(self):
        return {"constant_inputs_only": self.constant_inputs_only} if self.constant_inputs_only else {}

    def apply(self, fn, args, kwargs):
        if self.constant_inputs_only and torch.is_grad_enabled() and (
            any(carries_relevance(a) for a in args) or any(carries_relevance(v) for v in kwargs.values())
        ):
            raise RuleDeclined(f"{describe(fn)}'s output depends on relevance-carrying inputs: it is not a source")
        output = fn(*args, **kwargs)
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.is_floating_point():
            output = output.detach().requires_grad_()
        return output

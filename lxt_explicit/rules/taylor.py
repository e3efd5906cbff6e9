"""First-order Taylor decomposition of any function (AttnLRP Eq. 4-5)."""

from __future__ import annotations

import torch

from ..stabilizer import DEFAULT_EPSILON, check_epsilon
from .graph import NodeRule, input_times_vjp, normalized_relevance, output_tensors, output_values

__all__ = ["TaylorDecompositionRule"]


class TaylorDecompositionRule(NodeRule):
    r"""First-order Taylor decomposition of any function (AttnLRP Eq. 4-5).

    With a reference point :math:`\tilde x` the function is expanded as
    :math:`f(x) \approx f(\tilde x) + J(\tilde x)(x - \tilde x)` and input
    :math:`i` receives :math:`\sum_j (x_i - \tilde x_i) J_{ji}(\tilde x) R_j / d_j`.
    With ``reference=None`` the function is linearized at the input itself,
    :math:`f(x) = J(x)\,x + \beta`, and input :math:`i` receives
    :math:`\sum_j x_i J_{ji}(x) R_j / d_j` (the decomposition behind the
    softmax rule, Proposition 3.1).

    Parameters
    ----------
    reference : None, float, tensor, callable or tuple, optional
        Reference point :math:`\tilde x`: a number or tensor for every input, a
        callable ``input -> reference``, or a tuple with one of these per
        positional input.  ``None`` (default) linearizes at the input.
    bias : bool, optional
        If ``True`` (default) the denominators are the outputs
        :math:`d_j = f_j(x)`, so the zero-order (bias) term absorbs its share.
        If ``False`` they are the first-order terms, so relevance is conserved
        exactly: :math:`\sum_i R_{x_i} = \sum_j R_j`.
    epsilon : float, optional
        Stabilizer of the denominators.
    """

    needs_graph = True

    def __init__(self, *, reference=None, bias: bool = True, epsilon: float = DEFAULT_EPSILON):
        self.reference = reference
        self.bias = bool(bias)
        self.epsilon = check_epsilon(epsilon)

    def options(self):
        reference = self.reference if isinstance(self.reference, (type(None), int, float)) else id(self.reference)
        return {"reference": reference, "bias": self.bias, "epsilon": self.epsilon}

    def _reference_for(self, index, value):
        reference = self.reference[index] if isinstance(self.reference, tuple) else self.reference
        if callable(reference):
            reference = reference(value)
        if isinstance(reference, torch.Tensor):
            return reference.to(value).expand_as(value)
        return torch.full_like(value, float(reference))

    def record(self, ctx, fn, inputs, kwargs, outputs):
        ctx.outputs = outputs
        if self.reference is None:
            ctx.inputs = inputs
            ctx.factors = tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in inputs)
        else:
            points = tuple(
                self._reference_for(i, a.detach()).requires_grad_() if need else a
                for i, (a, need) in enumerate(zip(inputs, ctx.needs))
            )
            with torch.enable_grad():
                at_reference = fn(*points, **kwargs)
            ctx.inputs = points
            ctx.outputs, _ = output_tensors(at_reference, fn)
            ctx.factors = tuple(
                (a.detach() - p.detach()) if need else None for a, p, need in zip(inputs, points, ctx.needs)
            )
        ctx.denominators = None if self.bias else self._first_order_terms(ctx, fn, kwargs)

    def _first_order_terms(self, ctx, fn, kwargs):
        """``J(x~) (x - x~)`` (or ``J(x) x``) per output, by forward-mode differentiation."""
        primals = tuple(p.detach() if isinstance(p, torch.Tensor) else p for p in ctx.inputs)
        indices = [i for i, need in enumerate(ctx.needs) if need]

        def partial_fn(*relevant):
            args = list(primals)
            for i, value in zip(indices, relevant):
                args[i] = value
            return fn(*args, **kwargs)

        tangents = tuple(ctx.factors[i] for i in indices)
        _, terms = torch.func.jvp(partial_fn, tuple(primals[i] for i in indices), tangents)
        return terms if isinstance(terms, tuple) else (terms,)

    def relevance(self, ctx, out_relevance):
        denominators = output_values(ctx) if ctx.denominators is None else ctx.denominators
        outputs, normalized = normalized_relevance(ctx, out_relevance, denominators, self.epsilon)
        return input_times_vjp(ctx, outputs, normalized, ctx.factors)

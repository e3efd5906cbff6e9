"""Relevance of what a forward function returns: the machinery behind the Captum and Inseq methods.

Attribution libraries explain a *forward function*: the model, or a function that calls it and
computes something from its outputs (Captum's log-probability of a target token, Inseq's step
functions).  This module explains such a function with the rules of a Composite:

* :func:`explained_output` picks the value explained for each example (Captum's ``target``
  convention; for a language model's output the next-token logits);
* :class:`RelevancePass` registers the Composite on the model for one forward and one backward
  pass, and records the model's outputs and the token ids its embedding layers received;
* :func:`start_relevance` starts the backward pass at the model's outputs.

Operations between the model's outputs ``z`` and the explained value ``f`` run outside the
model's rules.  They get the first-order Taylor decomposition linearized at ``z`` with ``f``'s own
value as its relevance (AttnLRP Eq. 4-5, the decomposition behind the softmax rule): the relevance
entering the model is ``z * df/dz``.  For a function linear in the logits without a constant (a
logit, a difference of logits) this is exact, the logits receive their own values, and the result
equals :func:`lxt_explicit.explain.explain`; for the log-probability of token ``a`` it is
``R(a) - sum_k p_k R(k)``, where ``R(k)`` explains logit ``k``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from .composite import Composite

__all__ = ["explained_output", "model_output_tensors", "start_relevance", "RelevancePass"]


def _index(target: int | tuple) -> tuple:
    return (target,) if isinstance(target, int) else tuple(target)


def _per_example(output: torch.Tensor, target: Any) -> torch.Tensor:
    """Captum's target convention: one value of ``output`` per example (row)."""
    batch = output.shape[0]
    if isinstance(target, torch.Tensor):
        target = target.item() if target.numel() == 1 else target.tolist()
    if target is None:
        if output.numel() != batch:
            raise ValueError(
                f"the forward function returns shape {tuple(output.shape)}: give target= to choose one "
                "output per example"
            )
        return output.reshape(batch)
    if isinstance(target, list) and len(target) != batch:
        raise ValueError(f"target has {len(target)} entries for {batch} examples; give one per example")
    if not isinstance(target, (int, tuple, list)):
        raise TypeError(f"target must be None, an int, a tuple, a list or a tensor, got {type(target).__name__}")
    try:
        if isinstance(target, list):
            selected = torch.stack([output[(row, *_index(t))] for row, t in enumerate(target)])
        else:
            selected = output[(slice(None), *_index(target))]
    except IndexError as error:
        error.add_note(f"target {target!r} does not index the output of shape {tuple(output.shape)}")
        raise
    if selected.shape != (batch,):
        raise ValueError(
            f"target {target!r} selects shape {tuple(selected.shape)} from an output of shape "
            f"{tuple(output.shape)}; it must select one value per example"
        )
    return selected


def explained_output(output: Any, target: Any = None) -> torch.Tensor:
    """The value explained for each example: what the relevance starts from.

    Parameters
    ----------
    output : torch.Tensor, tuple or transformers ``ModelOutput``
        What the forward function returned.  With a ``logits`` attribute (a causal language
        model's output) the next-token logits ``logits[:, -1]`` are explained.
    target : int, tuple, list, torch.Tensor or None
        Captum's target: an index per example into the output (for a language model: a token id;
        ``None`` is the most likely next token, a tuple ``(position, token)`` any position).

    Returns
    -------
    torch.Tensor
        One value per example, shape ``(batch,)``.
    """
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        if isinstance(target, tuple):
            return _per_example(logits, target)
        last = logits[:, -1]
        return _per_example(last, last.argmax(-1).tolist() if target is None else target)
    if isinstance(output, tuple):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the forward function must return a tensor, got {type(output).__name__}")
    return _per_example(output, target)


def model_output_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a module's output (a tensor, tuple or mapping) that carry relevance.

    Parameters
    ----------
    output : any
        What a module returned.

    Returns
    -------
    list of torch.Tensor
        Its floating-point tensors that require a gradient, in order.
    """
    if isinstance(output, torch.Tensor):
        items = [output]
    elif isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        items = []
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def start_relevance(explained: torch.Tensor, model_outputs: list[torch.Tensor]) -> None:
    """Run the relevance backward pass: ``z * d(explained)/dz`` enters at each model output ``z``.

    Parameters
    ----------
    explained : torch.Tensor
        The explained values, shape ``(batch,)`` (see :func:`explained_output`), computed from
        ``model_outputs``; each example's value may depend on its own row only.
    model_outputs : list of torch.Tensor
        The outputs of the registered model (:attr:`RelevancePass.outputs`).

    Raises
    ------
    ValueError
        If the explained values do not depend on the model's outputs.
    """
    if not explained.requires_grad or not model_outputs:
        raise ValueError(
            "the explained output does not depend on the model's outputs with relevance: the forward "
            "function must call the model given as model= (or be that model)"
        )
    grads = torch.autograd.grad(explained.sum(), model_outputs, retain_graph=True, allow_unused=True)
    pairs = [(z, g * z.detach()) for z, g in zip(model_outputs, grads) if g is not None]
    if not pairs:
        raise ValueError("the explained output does not depend on the outputs of the model given as model=")
    torch.autograd.backward([z for z, _ in pairs], [seed for _, seed in pairs])


class RelevancePass:
    """Register a Composite on a model for one relevance pass and record what the model sees.

    Inside the ``with`` block the Composite is registered (unless it already is, on this model),
    :attr:`outputs` collects the model's output tensors and every ``nn.Embedding`` remembers the
    ids it received; on exit the hooks and, if registered here, the Composite are removed.

    Parameters
    ----------
    model : nn.Module
        The model to explain.
    composite : Composite
        The rules, e.g. ``lxt_explicit.attnlrp()``.
    """

    def __init__(self, model: nn.Module, composite: Composite):
        self.model = model
        self.composite = composite
        self.outputs: list[torch.Tensor] = []
        self.embedding_inputs: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.registered_here = False

    def __enter__(self) -> "RelevancePass":
        self.registered_here = self.composite.model is not self.model
        if self.registered_here:
            self.composite.register(self.model)
        try:
            self.handles.append(
                self.model.register_forward_hook(lambda m, a, out: self.outputs.extend(model_output_tensors(out)))
            )
            for name, module in self.model.named_modules():
                if isinstance(module, nn.Embedding):
                    self.handles.append(module.register_forward_pre_hook(self._embedding_hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _embedding_hook(self, name: str) -> Callable:
        def record(module, args):
            if args and isinstance(args[0], torch.Tensor):
                self.embedding_inputs.setdefault(name, args[0])

        return record

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.registered_here:
            self.composite.remove()
        return False

    def token_relevance(self, ids: torch.Tensor) -> torch.Tensor:
        """Relevance per token of ids the model embedded: its embeddings' relevance summed over the hidden dimension.

        Parameters
        ----------
        ids : torch.Tensor
            The very tensor of token ids passed to the model (after the backward pass).

        Returns
        -------
        torch.Tensor
            Relevance of the shape of ``ids``.
        """
        names = [name for name, seen in self.embedding_inputs.items() if seen is ids]
        sources = self.composite.source_relevance()
        found = [sources[name] for name in names if sources.get(name) is not None]
        if not found:
            raise ValueError(
                f"token ids of shape {tuple(ids.shape)} reached no embedding layer of the model that collects "
                "relevance; pass ids the model embeds itself (or float embeddings)"
            )
        relevance = sum(r.detach().sum(-1) for r in found)
        if relevance.shape != ids.shape:
            raise ValueError(f"relevance of shape {tuple(relevance.shape)} for ids of shape {tuple(ids.shape)}")
        return relevance

"""What an evaluation explains: one logit (or a difference of two) at one position, and how to compute it.

Every attribution method of :mod:`lxt_explicit.evaluate` explains the same kind of quantity, a
:class:`Target`: the logit of ``token`` at ``position`` (default the last one, the next token of a
causal language model; the masked position of a masked language model), optionally minus the logit
of ``contrast`` at the same position (subject-verb agreement: the correct minus the wrong verb form;
indirect-object identification: the indirect object minus the subject).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
from torch import nn

from ..targets import embedding_name, is_integer

__all__ = ["Target", "as_target", "embed", "embedding_name", "explained_values", "is_causal_lm", "model_logits"]


@dataclass(frozen=True)
class Target:
    """The explained quantity: ``logit[position, token] - logit[position, contrast]`` (without contrast: the logit).

    Attributes
    ----------
    token : int
        The explained token id.
    position : int
        The position whose logits are read (negative: from the end; default ``-1``, the last one).
    contrast : int or None
        A token whose logit is subtracted, or ``None``.
    """

    token: int
    position: int = -1
    contrast: int | None = None

    def __post_init__(self):
        for name in ("token", "position") + (("contrast",) if self.contrast is not None else ()):
            value = getattr(self, name)
            if not is_integer(value):
                raise TypeError(f"Target.{name} must be an integer (a token id or a position), got {value!r}")
        if self.token < 0 or (self.contrast is not None and self.contrast < 0):
            raise ValueError(f"token ids are not negative, got token={self.token}, contrast={self.contrast}")
        if self.contrast == self.token:
            raise ValueError(f"contrast equals token ({self.token}): the difference would be zero; give another token")

    def terms(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The explained logits and their signs, from ``logits`` of shape ``[batch, positions, vocabulary]``.

        Returns
        -------
        selected : torch.Tensor
            ``[batch, 1]`` (the token's logit) or ``[batch, 2]`` (the token's and the contrast's).
        signs : torch.Tensor
            ``[1]`` or ``[1, -1]``: the explained value is ``(selected * signs).sum(-1)``.
        """
        row = logits[:, self.position]
        ids = [self.token] if self.contrast is None else [self.token, self.contrast]
        signs = torch.tensor([1.0, -1.0][: len(ids)], dtype=row.dtype, device=row.device)
        return row[:, ids], signs

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """The explained value per batch row, ``[batch]``."""
        selected, signs = self.terms(logits)
        return (selected * signs).sum(-1)


def as_target(target: Target | int) -> Target:
    """``target`` as a :class:`Target` (a token id means that token's logit at the last position)."""
    if isinstance(target, Target):
        return target
    if not is_integer(target):
        raise TypeError(f"target must be a Target or a token id (int), got {type(target).__name__}")
    return Target(operator.index(target))


def embed(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings of ``input_ids`` (detached), ``[batch, tokens, hidden]``."""
    with torch.no_grad():
        return model.get_input_embeddings()(input_ids).detach()


def model_logits(model: nn.Module, target: Target, **inputs) -> torch.Tensor:
    """``model(**inputs).logits``, of the last position only where that is all ``target`` needs and the model can.

    Causal language models of transformers take ``logits_to_keep``; with ``target.position == -1``
    only the last position's logits are computed (the vocabulary projection of the others would be
    wasted).  The returned tensor's position ``target.position`` is the one the target reads.
    """
    if target.position == -1 and is_causal_lm(model):
        inputs["logits_to_keep"] = 1
    return model(**inputs, use_cache=False).logits if _takes_cache(model) else model(**inputs).logits


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model of transformers (its ``forward`` takes ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def _takes_cache(model: nn.Module) -> bool:
    return "use_cache" in inspect.signature(type(model).forward).parameters


def explained_values(model: nn.Module, target: Target, **inputs) -> torch.Tensor:
    """The explained value of ``target`` for every row of a batch, ``[batch]``."""
    return target.value(model_logits(model, target, **inputs))

"""AttnLRP and CP-LRP as Captum attributions: Captum's tools, metrics and LLM wrappers on our relevance.

Captum's own ``LRP`` covers linear, convolution, pooling, batch-norm and a few activation layers;
these classes bring the attention-aware rules of the presets to Captum's API:

* :class:`AttnLRP` and :class:`CPLRP` are primary attributions (like ``InputXGradient``): one
  relevance per input feature, in the shape of the inputs.  An integer input (token ids) gets one
  relevance per token: the relevance of its embedding, summed over the hidden dimension.
* :class:`LayerAttnLRP` and :class:`LayerCPLRP` are layer attributions (like
  ``LayerGradientXActivation``, which they extend, so that Captum's ``LLMGradientAttribution``
  accepts them): the relevance of a layer's output, e.g. of the input embeddings.

What is explained.  For a transformers model (an output with ``.logits``), ``target`` names a
token and the relevance starts at that token's logit at the last position with the logit's own
value, exactly as :func:`lxt_explicit.explain.explain` does (``target=None``: the most likely
token; a tuple ``(position, token)``: any position).  For any other forward function ``target``
selects one output per example as in Captum.  Operations applied to the model's outputs ``z``
(Captum's log-softmax in ``LLMGradientAttribution``) get the Taylor decomposition at ``z``, see
:mod:`lxt_explicit.forward_relevance`.

The convergence delta is the explained value minus the summed relevance (Captum's convention
for LRP), per example: what the stabilizers, biases and a non-linear head absorbed.

Registration is local to one call of ``attribute``: the rules are registered on the model for
one forward and one backward pass and removed afterwards (unless a given ``composite`` is
already registered on the model, which is then left as it is).

Needs Captum: ``pip install "lxt_explicit[captum]"`` (or ``pip install captum``).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

try:
    from captum.attr import (
        GradientAttribution,
        LayerGradientXActivation,
        LLMAttributionResult,
        LLMGradientAttribution,
        TextTemplateInput,
        TextTokenInput,
    )
except ImportError as error:  # pragma: no cover - depends on the environment
    error.add_note('lxt_explicit.captum needs Captum: pip install "lxt_explicit[captum]" (or: pip install captum)')
    raise

from .composite import Composite
from .forward_relevance import RelevancePass, explained_output, model_output_tensors, start_relevance
from .presets import attnlrp, cp_lrp
from .stabilizer import DEFAULT_EPSILON

__all__ = ["AttnLRP", "CPLRP", "LayerAttnLRP", "LayerCPLRP", "LLMRelevanceAttribution"]


def _model_of(forward_func: Callable, model: nn.Module | None) -> nn.Module:
    model = forward_func if model is None and isinstance(forward_func, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise TypeError(
            "give the model to explain as model= when the forward function is not the model itself "
            "(e.g. AttnLRP(lambda e: model(inputs_embeds=e).logits[:, -1], model=model))"
        )
    return model


def _leaf(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_()
    return value


def _delta(explained: torch.Tensor, relevance: tuple[torch.Tensor, ...]) -> torch.Tensor:
    total = sum(r.detach().reshape(r.shape[0], -1).sum(1) for r in relevance)
    return explained.detach() - total


def _as_tuple(value: Any) -> tuple:
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


class _Rules:
    """The rules of an attribution: a preset (or a given Composite) and the model they are registered on."""

    preset: Callable[..., Composite] = staticmethod(attnlrp)

    def _set_rules(self, forward_func: Callable, model, epsilon: float, composite: Composite | None) -> None:
        self.model = _model_of(forward_func, model)
        self.epsilon = float(epsilon)
        self.composite = composite

    def _composite(self) -> Composite:
        return self.composite if self.composite is not None else self.preset(epsilon=self.epsilon)

    def has_convergence_delta(self) -> bool:
        """The convergence delta is the explained value minus the summed relevance."""
        return True


# ----------------------------------------------------------------------------------- attributions


class AttnLRP(_Rules, GradientAttribution):
    """AttnLRP (Achtibat et al., ICML 2024) as a Captum attribution: relevance per input feature.

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model, or a function of the inputs that calls it (Captum's forward function).
    model : nn.Module, optional
        The model the rules are registered on; default: ``forward_func`` when it is a module.
    epsilon : float, optional
        Stabilizer of the rules (ignored when ``composite`` is given).
    composite : Composite, optional
        Rules to use instead of the preset (e.g. ``lxt.attnlrp(layer_map=...)``).

    Examples
    --------
    >>> relevance, delta = AttnLRP(model).attribute(input_ids, target=token_id,  # doctest: +SKIP
    ...                                             return_convergence_delta=True)
    """

    def __init__(
        self,
        forward_func: Callable,
        *,
        model: nn.Module | None = None,
        epsilon: float = DEFAULT_EPSILON,
        composite: Composite | None = None,
    ) -> None:
        GradientAttribution.__init__(self, forward_func)
        self._set_rules(forward_func, model, epsilon, composite)

    @property
    def multiplies_by_inputs(self) -> bool:
        """Relevance is a global attribution (it sums to the explained value), like Input x Gradient."""
        return True

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
    ) -> Any:
        """Relevance of every input feature for the explained output.

        Parameters
        ----------
        inputs : torch.Tensor or tuple of torch.Tensor
            The forward function's first arguments.  Floating-point inputs get one relevance per
            element; integer inputs (token ids) one per token.
        target : int, tuple, list, torch.Tensor or None
            What to explain, see :func:`~lxt_explicit.forward_relevance.explained_output`.
        additional_forward_args : any, optional
            Further arguments of the forward function, after ``inputs``.
        return_convergence_delta : bool, optional
            Also return, per example, the explained value minus the summed relevance.

        Returns
        -------
        torch.Tensor or tuple of torch.Tensor
            Relevance in the shape of each input (a tuple if ``inputs`` is a tuple), and the
            delta of shape ``(batch,)`` if ``return_convergence_delta``.
        """
        single = not isinstance(inputs, tuple)
        inputs = (inputs,) if single else inputs
        with RelevancePass(self.model, self._composite()) as run, torch.enable_grad():
            leaves = tuple(_leaf(x) for x in inputs)
            explained = explained_output(self.forward_func(*leaves, *_as_tuple(additional_forward_args)), target)
            start_relevance(explained, run.outputs)
            relevance = tuple(
                (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).detach()
                if leaf.is_floating_point()
                else run.token_relevance(leaf)
                for leaf in leaves
            )
        result = relevance[0] if single else relevance
        return (result, _delta(explained, relevance)) if return_convergence_delta else result


class CPLRP(AttnLRP):
    """CP-LRP (no relevance through the attention weights) as a Captum attribution; see :class:`AttnLRP`."""

    preset = staticmethod(cp_lrp)


class LayerAttnLRP(_Rules, LayerGradientXActivation):
    """AttnLRP as a Captum layer attribution: the relevance of a layer's output (or input).

    It extends Captum's ``LayerGradientXActivation`` only so that Captum's wrappers that accept
    layer-gradient methods accept it; its results are relevance, not gradient x activation.  On the
    input embeddings, ``LLMGradientAttribution(LayerAttnLRP(model, model.get_input_embeddings()),
    tokenizer)`` explains generated text token by token.

    Parameters
    ----------
    forward_func : nn.Module or callable
        The model, or a function of the inputs that calls it.
    layer : nn.Module
        The layer whose output (or input) relevance is returned.
    device_ids : list of int, optional
        Unused (Captum's signature); the model runs as it is.
    model, epsilon, composite
        As in :class:`AttnLRP`.
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: nn.Module,
        device_ids: list[int] | None = None,
        *,
        model: nn.Module | None = None,
        epsilon: float = DEFAULT_EPSILON,
        composite: Composite | None = None,
    ) -> None:
        LayerGradientXActivation.__init__(self, forward_func, layer, device_ids)
        self._set_rules(forward_func, model, epsilon, composite)
        if not any(module is layer for module in self.model.modules()):
            raise ValueError(f"layer {type(layer).__name__} is not a module of the model")

    def attribute(
        self,
        inputs: torch.Tensor | tuple[torch.Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        return_convergence_delta: bool = False,
    ) -> Any:
        """Relevance of the layer's output (or first input) for the explained output.

        Parameters
        ----------
        inputs, target, additional_forward_args, return_convergence_delta
            As in :meth:`AttnLRP.attribute`.
        attribute_to_layer_input : bool, optional
            Return the relevance of the layer's first input instead of its output.

        Returns
        -------
        torch.Tensor
            Relevance in the shape of the layer's output (or input), and the delta if asked for.
        """
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        seen: list[torch.Tensor] = []
        with RelevancePass(self.model, self._composite()) as run, torch.enable_grad():
            run.handles.append(self._watch(attribute_to_layer_input, seen))
            output = self.forward_func(*(_leaf(x) for x in inputs), *_as_tuple(additional_forward_args))
            explained = explained_output(output, target)
            if len(seen) != 1:
                raise ValueError(f"the layer ran {len(seen)} times with relevance in a forward pass; it must run once")
            relevance = []
            seen[0].register_hook(lambda grad: relevance.append(grad.detach()))
            start_relevance(explained, run.outputs)
        result = relevance[0] if relevance else torch.zeros_like(seen[0]).detach()
        return (result, _delta(explained, (result,))) if return_convergence_delta else result

    def _watch(self, layer_input: bool, seen: list) -> Any:
        def keep(value):
            tensors = model_output_tensors(value)
            if tensors:
                seen.append(tensors[0])

        if layer_input:
            return self.layer.register_forward_pre_hook(lambda module, args: keep(args))
        return self.layer.register_forward_hook(lambda module, args, out: keep(out))


class LayerCPLRP(LayerAttnLRP):
    """CP-LRP as a Captum layer attribution; see :class:`LayerAttnLRP`."""

    preset = staticmethod(cp_lrp)


# ----------------------------------------------------------------------------------- text templates


def _value_spans(inp: TextTemplateInput, text: str) -> list[tuple[int, int, int]]:
    """``(value index, start, end)`` of every value of a template in the text it formats."""
    markers = [f"\x00{index}\x00" for index in range(inp.n_features)]
    marked = inp.format_fn(**dict(zip(inp.dict_keys, markers))) if inp.dict_keys else inp.format_fn(*markers)
    spans, pieces, length = [], [], 0
    for position, piece in enumerate(re.split("\x00(\\d+)\x00", marked)):
        if position % 2:
            index, piece = int(piece), inp.values[int(piece)]
            spans.append((index, length, length + len(piece)))
        pieces.append(piece)
        length += len(piece)
    if "".join(pieces) != text:
        raise ValueError("the template must insert its values unchanged (a callable template may not transform them)")
    return spans


def _segments(inp: TextTemplateInput, text: str, tokenizer: Any) -> torch.Tensor:
    """Matrix ``(tokens, interpretable features)``: 1 where a token overlaps a value of the template."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("TextTemplateInput needs a fast tokenizer (for the character offsets of its tokens)")
    encoded = tokenizer(text, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != tokenizer.encode(text):
        raise ValueError("the tokenizer's tokens with offsets differ from its encode(); cannot map values to tokens")
    spans = _value_spans(inp, text)
    matrix = torch.zeros(len(encoded["input_ids"]), inp.n_itp_features, dtype=torch.float64)
    for token, (start, end) in enumerate(encoded["offset_mapping"]):
        for index, value_start, value_end in spans:
            if end > start and start < value_end and end > value_start:
                matrix[token, inp.formatted_mask[index] if inp.mask is not None else index] = 1.0
                break
    return matrix


class LLMRelevanceAttribution(LLMGradientAttribution):
    """Captum's ``LLMGradientAttribution`` with :class:`LayerAttnLRP` that also takes ``TextTemplateInput``.

    Captum's ``LLMGradientAttribution`` accepts only ``TextTokenInput``.  Relevance is additive, so
    the relevance of a template's value (a segment of the text) is the sum of the relevance of the
    tokens it covers; tokens of the template's own text are left out, and values grouped by the
    template's ``mask`` share their summed relevance (Captum's convention).  ``TextTokenInput`` is
    handled by Captum's class unchanged.  What is explained is what ``LLMGradientAttribution``
    explains: the log-probability of each target token (see :mod:`lxt_explicit.forward_relevance`).

    Parameters
    ----------
    attr_method : LayerAttnLRP
        On the input embeddings: ``LayerAttnLRP(model, model.get_input_embeddings())``.
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer (a fast tokenizer, for the offsets of ``TextTemplateInput``).
    """

    def __init__(self, attr_method: LayerAttnLRP, tokenizer: Any) -> None:
        if not isinstance(attr_method, LayerAttnLRP):
            raise TypeError(f"attr_method must be a LayerAttnLRP (or LayerCPLRP), got {type(attr_method).__name__}")
        super().__init__(attr_method, tokenizer)

    def attribute(
        self,
        inp: TextTokenInput | TextTemplateInput,
        target: str | torch.Tensor | None = None,
        gen_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LLMAttributionResult:
        """Relevance of the input's features for every target token and for the whole target.

        Parameters
        ----------
        inp : TextTokenInput or TextTemplateInput
            The prompt.
        target : str or torch.Tensor, optional
            The target text (or token ids); default: generated greedily with ``gen_args``.
        gen_args : dict, optional
            Generation arguments when ``target`` is not given.
        **kwargs
            Passed on to :meth:`LayerAttnLRP.attribute`.

        Returns
        -------
        captum.attr.LLMAttributionResult
            ``token_attr`` of shape ``(target tokens, features)`` and ``seq_attr`` (their sum).
        """
        if not isinstance(inp, TextTemplateInput):
            return super().attribute(inp, target, gen_args, **kwargs)
        text = inp.to_model_input()
        tokens = super().attribute(TextTokenInput(text, self.tokenizer), target, gen_args, **kwargs)
        rows = torch.cat([tokens.seq_attr[None], tokens.token_attr])
        rows = rows @ _segments(inp, text, self.tokenizer).to(rows)
        rows = inp.format_attr(rows)
        return LLMAttributionResult(
            seq_attr=rows[0], token_attr=rows[1:], input_tokens=inp.values, output_tokens=tokens.output_tokens, inp=inp
        )

"""AttnLRP and CP-LRP rules for attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``."""

from __future__ import annotations

import inspect
import math
import threading
import weakref

import torch
import torch.nn.functional as F

from .. import functional as lf
from ..functional.sinks import BOS, GATE, check_sinks
from ..ops import argument
from ..stabilizer import DEFAULT_EPSILON, check_epsilon
from .base import Rule, RuleDeclined, describe

__all__ = ["AttentionRule", "MultiheadAttentionRule"]

_SDPA_ARGUMENTS = (
    ("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False),
    ("scale", None), ("enable_gqa", False),
)


_SDPA_NAMES = frozenset(name for name, _ in _SDPA_ARGUMENTS)


class _MaskPurity:
    """Whether a mask is bias-free, read once per mask tensor (every layer of a forward pass gets the same mask)."""

    def __init__(self):
        self.known: dict[int, tuple[weakref.ref, bool]] = {}

    def __call__(self, mask) -> bool | None:
        if mask is None or mask.dtype == torch.bool:
            return True
        key = id(mask)
        entry = self.known.get(key)
        if entry is not None and entry[0]() is mask:
            return entry[1]
        pure = lf.mask_is_pure(mask)
        self.known[key] = (weakref.ref(mask, lambda _, key=key, known=self.known: known.pop(key, None)), pure)
        return pure


class AttentionRule(Rule):
    """AttnLRP (or, with ``cp=True``, CP-LRP) rules for ``F.scaled_dot_product_attention``.

    See :func:`~lxt_explicit.functional.scaled_dot_product_attention`.  Whether a mask carries a
    bias is read once per mask tensor, not in every layer.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of the denominators.
    cp : bool, optional
        No relevance through the attention weights (CP-LRP).
    sinks : {None, 'gate', 'bos', 'mix'} or float, optional
        ``None`` (AttnLRP as published), ``'gate'``, ``'mix'`` or a threshold in ``[0, 1)`` (see
        :func:`~lxt_explicit.functional.scaled_dot_product_attention` and ``docs/attention_sinks.md``).
        ``'bos'``: ``'gate'`` in the forward passes whose first token is the beginning-of-sequence
        token, ``None`` in the others; the registered model tells the rule which it is
        (:meth:`first_token_is_bos`, called by :class:`~lxt_explicit.sink_extensions.BosSink`).
    """

    def __init__(self, *, epsilon: float = DEFAULT_EPSILON, cp: bool = False, sinks: float | str | None = None):
        self.epsilon = check_epsilon(epsilon)
        self.cp = bool(cp)
        self.sinks = check_sinks(sinks)
        self._purity = _MaskPurity()
        self._first_token = threading.local()

    def options(self):
        options = {"epsilon": self.epsilon, "cp": self.cp}
        if self.sinks is not None:
            options["sinks"] = self.sinks
        return options

    def copy(self) -> "AttentionRule":
        return type(self)(epsilon=self.epsilon, cp=self.cp, sinks=self.sinks)

    def first_token_is_bos(self, value: bool | None) -> None:
        """For ``sinks='bos'``: whether this thread's forward pass starts with the BOS token (``None``: unknown)."""
        self._first_token.is_bos = value

    def first_token_decision(self) -> bool | None:
        """What :meth:`first_token_is_bos` last set in this thread (``None``: unknown)."""
        return getattr(self._first_token, "is_bos", None)

    def _resolved_sinks(self):
        if self.sinks != BOS:
            return self.sinks
        is_bos = self.first_token_decision()
        if is_bos is None and not torch.is_grad_enabled():
            return None  # no relevance to compute (generation with a cache): the forward pass is the same
        if is_bos is None:
            raise RuntimeError(
                "lxt_explicit: sinks='bos' applies the sink gate only where the first token is the model's "
                "beginning-of-sequence token, so it needs the input_ids of the forward pass; this attention ran "
                "without them (a model called with inputs_embeds or with a filled key-value cache, or a rule used "
                "outside a registered transformers model). Call the model with input_ids and no cache, or choose "
                "sinks='gate' or sinks=None."
            )
        return GATE if is_bos else None

    def explain_call(self, fn, args, kwargs):
        if fn is not F.scaled_dot_product_attention:
            raise RuleDeclined(f"AttentionRule covers F.scaled_dot_product_attention, not {describe(fn)}")
        if not set(kwargs) <= {name for name, _ in _SDPA_ARGUMENTS} or len(args) > len(_SDPA_ARGUMENTS):
            raise RuleDeclined(f"AttentionRule does not know the arguments {sorted(set(kwargs) - _SDPA_NAMES)}")
        values = {name: argument(args, kwargs, i, name, default) for i, (name, default) in enumerate(_SDPA_ARGUMENTS)}
        if values["dropout_p"]:
            raise RuntimeError(
                f"lxt_explicit: scaled_dot_product_attention was called with dropout_p={values['dropout_p']}; "
                "attention dropout makes relevance random. Call model.eval() or set the attention dropout to 0."
            )
        return self.attention(
            values["query"], values["key"], values["value"], attn_mask=values["attn_mask"],
            is_causal=values["is_causal"], scale=values["scale"], enable_gqa=values["enable_gqa"],
        )

    def attention(self, q, k, v, **options):
        """:func:`~lxt_explicit.functional.scaled_dot_product_attention` with this rule's settings."""
        return lf.scaled_dot_product_attention(
            q, k, v, epsilon=self.epsilon, cp=self.cp, mask_is_bias_free=self._purity(options.get("attn_mask")),
            sinks=self._resolved_sinks(), **options,
        )


def _additive(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class MultiheadAttentionRule(AttentionRule):
    """AttnLRP / CP-LRP for ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, torchvision's ViT).

    The function's standard path is replayed with the library's operations: epsilon rule on the
    input and output projections, :class:`AttentionRule` on the attention itself.  Calls with
    ``bias_k``/``bias_v``, ``add_zero_attn``, static keys/values or active dropout are declined
    (reported as unhandled).  Returned attention weights, if requested, carry no relevance.
    """

    _SIGNATURE = inspect.signature(F.multi_head_attention_forward)

    def explain_call(self, fn, args, kwargs):
        if fn is not F.multi_head_attention_forward:
            raise RuleDeclined(f"MultiheadAttentionRule covers F.multi_head_attention_forward, not {describe(fn)}")
        bound = self._SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if (
            a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]
            or a["static_k"] is not None or a["static_v"] is not None or (a["training"] and a["dropout_p"] > 0)
        ):
            raise RuleDeclined(
                "MultiheadAttentionRule covers no bias_k/bias_v, add_zero_attn, static keys/values or dropout"
            )
        query, key, value = a["query"], a["key"], a["value"]
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        tgt_len, bsz, embed_dim = query.shape
        heads = a["num_heads"]
        q, k, v = self._project(query, key, value, a, embed_dim)
        attn_mask = self._merged_mask(a, query.dtype, bsz, heads, tgt_len, key.shape[0], batched)
        is_causal = bool(a["is_causal"]) and attn_mask is None
        q, k, v = (
            t.view(t.shape[0], bsz * heads, -1).transpose(0, 1).view(bsz, heads, t.shape[0], -1) for t in (q, k, v)
        )
        out = self.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
        out = lf.linear_epsilon(out, a["out_proj_weight"], a["out_proj_bias"], epsilon=self.epsilon)
        out = out.view(tgt_len, bsz, embed_dim)
        weights = self._weights(q, k, attn_mask, a, batched) if a["need_weights"] else None
        return (out if batched else out.squeeze(1)), weights

    @staticmethod
    def _weights(q, k, attn_mask, a, batched):
        with torch.no_grad():
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, -1)
            weights = weights.mean(1) if a["average_attn_weights"] else weights
            return weights if batched else weights.squeeze(0)

    def _project(self, query, key, value, a, embed_dim):
        def linear(x, w, b):
            return lf.linear_epsilon(x, w, b, epsilon=self.epsilon)

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
        attn_mask = _additive(a["attn_mask"], dtype)
        padding = _additive(a["key_padding_mask"], dtype)
        if padding is not None and not batched:
            padding = padding.unsqueeze(0)
        if attn_mask is not None:
            shape = (1, 1, tgt_len, src_len) if attn_mask.dim() == 2 else (bsz, heads, tgt_len, src_len)
            attn_mask = attn_mask.view(shape)
        if padding is not None:
            padding = padding.view(bsz, 1, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        return attn_mask

"""Presets: AttnLRP and CP-LRP for Hugging Face transformers models as shipped.

``attnlrp().register(model)`` works on instances of the installed
transformers' own classes; nothing is copied or patched.  A preset is a
layer map for the few modules whose rule depends on what the whole module
does (RMS norms, activation modules written as several torch ops, embedding
layers as relevance sources) plus one op rule per op group for everything
else (linear layers, residual sums, gated products, attention, softmax,
layer norm, ...).
"""

from __future__ import annotations

from torch import nn

from .checkpointing import TransformersCheckpointing
from .composite import Composite
from .rules import (
    ActivationRule,
    AttentionRule,
    DivisionRule,
    DropoutRule,
    EinsumRule,
    EpsilonRule,
    IdentityRule,
    LayerNormRule,
    LinearSolveRule,
    MultiheadAttentionRule,
    RelevanceSource,
    Rule,
    SoftmaxRule,
    StopRelevanceRule,
    UniformEpsilonRule,
    UniformRule,
)
from .sink_extensions import BosSink, EagerAttentionWarning
from .stabilizer import DEFAULT_EPSILON, check_epsilon
from .state_space import StateSpaceMixers

__all__ = [
    "attnlrp",
    "attnlrp_sinks",
    "SINKS",
    "cp_lrp",
    "op_rules",
    "transformer_layer_map",
    "is_rms_norm",
    "is_activation",
    "is_router",
    "is_position_embedding",
    "is_attention_bias",
    "SUPPORTED_ARCHITECTURES",
    "EMBEDDING_PARAMETERS",
    "supported_architectures_table",
]

#: Architectures whose unmodified transformers classes the presets are tested on
#: (family -> classes).  Each has a zero-unhandled-ops audit and a Gradient x Input
#: cross-check in the test suite.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "Llama": ("LlamaForCausalLM", "LlamaModel"),
    "Mistral": ("MistralForCausalLM", "MistralModel"),
    "Qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
    "Qwen3": ("Qwen3ForCausalLM", "Qwen3Model"),
    "Gemma3 (text)": ("Gemma3ForCausalLM", "Gemma3TextModel"),
    "GPT-2": ("GPT2LMHeadModel", "GPT2Model"),
    "BERT family (BERT, RoBERTa, MiniLM)": (
        "BertForMaskedLM",
        "BertForSequenceClassification",
        "BertModel",
        "RobertaForMaskedLM",
        "RobertaModel",
    ),
    "ViT": ("ViTForImageClassification", "ViTModel"),
    "Mixture of experts (eager, grouped_mm and batched_mm experts)": (
        "Qwen3MoeForCausalLM",
        "Qwen2MoeForCausalLM",
        "MixtralForCausalLM",
        "OlmoeForCausalLM",
        "PhimoeForCausalLM",
        "GraniteMoeForCausalLM",
        "GptOssForCausalLM",
        "DeepseekV3ForCausalLM",
        "Llama4ForCausalLM",
    ),
    "Cohere, Cohere2 (written-out layer norms)": ("CohereForCausalLM", "Cohere2ForCausalLM"),
    "BLOOM, MPT (ALiBi)": ("BloomForCausalLM", "BloomModel", "MptForCausalLM", "MptModel"),
    "BART family (BART, mBART, Marian, Pegasus)": (
        "BartForConditionalGeneration",
        "MBartForConditionalGeneration",
        "MarianMTModel",
        "PegasusForConditionalGeneration",
    ),
    "T5 family (T5, mT5, LongT5)": (
        "T5ForConditionalGeneration",
        "MT5ForConditionalGeneration",
        "LongT5ForConditionalGeneration",
    ),
    "Vision encoders (DINOv2 with and without registers, SigLIP, SigLIP2, CLIP, DeiT, BEiT, Swin)": (
        "Dinov2ForImageClassification",
        "Dinov2WithRegistersForImageClassification",
        "SiglipForImageClassification",
        "Siglip2ForImageClassification",
        "CLIPForImageClassification",
        "DeiTForImageClassificationWithTeacher",
        "BeitForImageClassification",
        "SwinForImageClassification",
    ),
    "CNNs (ResNet, ConvNeXt, ConvNeXt V2, EfficientNet; also through Zennit composites)": (
        "ResNetForImageClassification",
        "ConvNextForImageClassification",
        "ConvNextV2ForImageClassification",
        "EfficientNetForImageClassification",
    ),
}

def supported_architectures_table() -> str:
    """The README's table of supported architectures, generated from :data:`SUPPORTED_ARCHITECTURES`."""
    rows = ["| family | transformers classes |", "|---|---|"]
    for family, classes in SUPPORTED_ARCHITECTURES.items():
        rows.append(f"| {family} | {', '.join(f'`{c}`' for c in classes)} |")
    return "\n".join(rows)


_TORCH_ACTIVATIONS = (
    nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.SELU, nn.CELU,
)


def is_rms_norm(name: str, module: nn.Module) -> bool:
    """RMS normalization layers: ``nn.RMSNorm`` and classes named ``*RMSNorm`` (``LlamaRMSNorm``, ...)."""
    return isinstance(module, getattr(nn, "RMSNorm", ())) or type(module).__name__.endswith("RMSNorm")


#: Class-name endings of the activation modules that model files define themselves (BLOOM's ``BloomGelu``,
#: whose custom autograd Function hides its operations from the routing).
_ACTIVATION_SUFFIXES = ("Gelu", "GELU", "GeLU")


def is_activation(name: str, module: nn.Module) -> bool:
    """Element-wise activation modules.

    Torch's, ``transformers.activations``' (``NewGELUActivation``, ...) and parameter-free leaf
    modules named ``*Gelu`` / ``*GELU`` / ``*GeLU`` (``BloomGelu``).
    """
    if isinstance(module, _TORCH_ACTIVATIONS) or type(module).__module__ == "transformers.activations":
        return True
    return type(module).__name__.endswith(_ACTIVATION_SUFFIXES) and not list(module.children()) and not list(
        module.parameters()
    )


def is_router(name: str, module: nn.Module) -> bool:
    """The router of a mixture-of-experts layer: classes named ``*Router`` (``Qwen3MoeTopKRouter``, ...)."""
    return type(module).__name__.endswith(("Router", "TopKGating"))


def is_position_embedding(name: str, module: nn.Module) -> bool:
    """Position embeddings computed by a module of their own (sinusoidal ones: ``*PositionalEmbedding``, ...)."""
    return type(module).__name__.endswith(_POSITION_EMBEDDINGS) and not isinstance(module, nn.Embedding)


_POSITION_EMBEDDINGS = ("PositionalEmbedding", "PositionEmbedding", "PositionalEncoding", "PositionEncoding")
def is_attention_bias(name: str, module: nn.Module) -> bool:
    """Embeddings of relative positions that are added to attention scores (T5's ``relative_attention_bias``)."""
    return isinstance(module, nn.Embedding) and name.endswith("relative_attention_bias")


def transformer_layer_map(*, relevance_sources: bool = True, constant_routers: bool = False) -> dict:
    """The module-level part of the presets.

    Parameters
    ----------
    relevance_sources : bool, optional
        Make every ``nn.Embedding`` (token, position and token-type embeddings) a
        :class:`~lxt_explicit.rules.RelevanceSource`.  Without it, an embedding
        added inside the model is a constant and absorbs its share of relevance.
        Relative attention biases (:func:`is_attention_bias`) are constants either way:
        like ALiBi and like a bias in an attention mask, they are summands of the scores.
    constant_routers : bool, optional
        The routers of mixture-of-experts layers (:func:`is_router`) are constants: their
        routing weights receive no relevance (CP-LRP).
    """
    layer_map: dict = {}
    if constant_routers:
        layer_map[is_router] = StopRelevanceRule
    if relevance_sources:
        layer_map[is_attention_bias] = None
        layer_map[nn.Embedding] = RelevanceSource
        # a position embedding computed from positions only is an input of the explanation too (it is not
        # absorbed where it is added); one that adds itself to relevance-carrying states declines
        layer_map[is_position_embedding] = RelevanceSource(constant_inputs_only=True)
    layer_map[is_rms_norm] = IdentityRule
    layer_map[is_activation] = ActivationRule
    return layer_map


#: Parameters that some architectures add to the token embeddings inside the model
#: (ViT's class token and position embeddings, DeiT's distillation token, DINOv2's register tokens,
#: CLIP's class embedding, SigLIP2's position embeddings, which it resizes to each image).
EMBEDDING_PARAMETERS: tuple[str, ...] = (
    "*embeddings.cls_token",
    "*embeddings.position_embeddings",
    "*embeddings.distillation_token",
    "*embeddings.register_tokens",
    "*embeddings.class_embedding",
    "*embeddings.position_embedding.weight",
)


def op_rules(
    *, epsilon: float = DEFAULT_EPSILON, cp: bool = False, gates: str = "relevant", sinks: float | str | None = None
) -> dict[str, Rule]:
    """The op rules of AttnLRP (``cp=False``) or CP-LRP (``cp=True``), one per op group.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of every denominator.
    cp : bool, optional
        Treat attention weights as constants (CP-LRP): softmax outputs are
        detached and scaled dot-product attention sends all relevance to the values.
    gates : {'relevant', 'constant'}, optional
        Products of an activation's output (a gate) with another relevance-carrying tensor:
        uniform rule on both factors, or the gate as a constant (see :class:`~lxt_explicit.rules.UniformRule`).
    sinks : {None, 'gate', 'mix'} or float, optional
        Attention-sink setting of the attention rule (see :func:`attnlrp`); ``None``: AttnLRP as published.
    """
    epsilon = check_epsilon(epsilon)
    return {
        "linear": UniformEpsilonRule(epsilon=epsilon),
        "matmul": UniformEpsilonRule(epsilon=epsilon),
        "add": EpsilonRule(epsilon=epsilon),
        "sub": EpsilonRule(epsilon=epsilon),
        "mul": UniformRule(gates=gates, epsilon=epsilon),
        "div": DivisionRule(),
        "neg": IdentityRule(),
        "softmax": StopRelevanceRule() if cp else SoftmaxRule(),
        "attention": AttentionRule(epsilon=epsilon, cp=cp, sinks=sinks),
        "multi_head_attention": MultiheadAttentionRule(epsilon=epsilon, cp=cp, sinks=sinks),
        "layer_norm": LayerNormRule(epsilon=epsilon),
        "rms_norm": IdentityRule(),
        "normalize": IdentityRule(),
        "mean": EpsilonRule(epsilon=epsilon),
        "sum": EpsilonRule(epsilon=epsilon),
        "activation": ActivationRule(),
        "dropout": DropoutRule(),
        "conv": UniformEpsilonRule(epsilon=epsilon),
        "avg_pool": UniformEpsilonRule(epsilon=epsilon),
        "batch_norm": UniformEpsilonRule(epsilon=epsilon),
        # normalizations written out (x * rsqrt(mean(x ** 2) + eps), (x - mean) / sqrt(var + eps)): the
        # power is an element-wise function, the root, variance or norm a normalizer (a constant,
        # Proposition 3.4), so the written-out norms get the rules of RMS and layer normalization
        "pow": IdentityRule(),
        "root": StopRelevanceRule(),
        "variance": StopRelevanceRule(),
        "norm": StopRelevanceRule(),
        "resample": UniformEpsilonRule(epsilon=epsilon),  # interpolation and fold: linear maps
        "grouped_mm": UniformEpsilonRule(epsilon=epsilon),
        # a product plus a scaled summand (BLOOM's scores with their ALiBi bias): the bias a constant summand
        "matmul_add": UniformEpsilonRule(epsilon=epsilon),
        "index_add": EpsilonRule(epsilon=epsilon),
        "scatter_add": EpsilonRule(epsilon=epsilon),
        "einsum": EinsumRule(epsilon=epsilon),
        "solve": LinearSolveRule(epsilon=epsilon),
    }


def _in_front(extra: dict | None, layer_map: dict) -> dict:
    """``extra``'s entries first (first match wins), then the preset's entries it does not replace."""
    merged = dict(extra or {})
    for key, value in layer_map.items():
        merged.setdefault(key, value)
    return merged


#: The recommended attention-sink setting of :func:`attnlrp_sinks` (chosen on two models and four
#: prompt sets, ``benchmarks/results/sinks.md``): the sink gate where the first token is the BOS token.
SINKS: str = "bos"


def attnlrp(
    *,
    epsilon: float = DEFAULT_EPSILON,
    relevance_sources: bool = True,
    strict: bool = False,
    layer_map: dict | None = None,
    ops: dict | None = None,
    sinks: float | str | None = None,
) -> Composite:
    """A fresh Composite with the AttnLRP rules (Achtibat et al., ICML 2024).

    ``sinks=None`` (the default) gives the paper's rules unchanged. Models with strong attention
    sinks (measured on Gemma-3-270m; LXT reports the same for Qwen3: many heads put most of their
    weight on the first token) lose most of the relevance in the softmax rule's bias term and give
    the first token large negative relevance. ``sinks='gate'`` writes every attention row as
    ``o = s_z v_z + (1 - s_z) o'``, with ``s_z`` its weight on the sink key and ``o'`` the attention
    over the other keys: the gate ``1 - s_z`` is a constant (as LXT's CP-LRP treats gates), the
    sink's value ``s_z v_z`` is the head's bias, and the paper's rules apply to ``o'`` unchanged (a
    row without weight on the sink gets the paper's rule).  ``sinks='bos'`` applies the gate where
    the sequences start with the model's beginning-of-sequence token, whose keys and values are then
    constants of a causal model, and the paper's rules where the first token is a word of the text
    (:class:`~lxt_explicit.sink_extensions.BosSink`).  ``sinks='mix'`` splits every row's
    relevance instead: the share ``s_z`` with constant attention weights (CP-LRP), the rest with the
    softmax rule; ``sinks=t`` (a number) treats the rows with ``s_z > t`` as constants.  These deviate
    from the paper and from LXT (which apply the softmax rule to the whole row) because the softmax
    rule's output depends on the logits' common offset, which a sink makes large; see
    ``docs/attention_sinks.md`` for the math and the measurements. :func:`attnlrp_sinks` gives the
    recommended setting.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of every denominator.
    relevance_sources : bool, optional
        Collect relevance at every embedding layer (see :func:`transformer_layer_map`)
        and at the embedding parameters of :data:`EMBEDDING_PARAMETERS`.
    strict : bool, optional
        Raise on the first operation on the relevance path without a rule.
    layer_map : dict, optional
        More layer-map entries, tried before the preset's own (e.g. ``{MyNorm: IdentityRule}`` for
        a normalization class the preset does not know).
    ops : dict, optional
        Op rules that replace or extend the preset's (e.g. ``{torch.cumsum: EpsilonRule()}``).
    sinks : {None, 'gate', 'bos', 'mix'} or float, optional
        ``None``: AttnLRP as published.  ``'gate'``: the weight on the sink key (the first key the
        sequence attends to) a constant gate, the sink's value a bias, the softmax rule on the other
        keys.  ``'bos'``: ``'gate'`` in forward passes whose sequences start with the BOS token
        (``config.bos_token_id``; causal models called with ``input_ids``), ``None`` in the others.
        ``'mix'``: each query row's relevance split by its attention weight on the sink key.
        A threshold in ``[0, 1)``: rows whose weight on the sink exceeds it get constant attention
        weights.  Applies
        to ``F.scaled_dot_product_attention`` (the
        ``"sdpa"`` attention of transformers models) and ``nn.MultiheadAttention``; eager
        attention (``torch.softmax`` then ``matmul``) keeps the paper's softmax rule.

    Returns
    -------
    Composite
        Register it with ``attnlrp().register(model)``.
    """
    rules = op_rules(epsilon=epsilon, sinks=sinks)
    return _preset(rules, False, relevance_sources, strict, layer_map, ops)


def attnlrp_sinks(
    *,
    threshold: float | str = SINKS,
    epsilon: float = DEFAULT_EPSILON,
    relevance_sources: bool = True,
    strict: bool = False,
    layer_map: dict | None = None,
    ops: dict | None = None,
) -> Composite:
    """AttnLRP with attention-sink handling: ``attnlrp(sinks=threshold)`` with the recommended setting.

    The setting ``'bos'`` (see :func:`attnlrp`) gates the sink where it is the beginning-of-sequence
    token: on Gemma-3-270m, whose tokenizer adds it and where the sink absorbs the relevance, the
    answer word ranked first in far more correctly answered items than with the paper's rules; where
    the first token is a word (SmolLM2 on plain text) the rules are the paper's, whose answer-first
    rate and faithfulness the gate did not improve there.  Numbers and commands in
    ``benchmarks/results/sinks.md``, the math in ``docs/attention_sinks.md``.  ``attnlrp()`` stays
    the paper's rules.

    Parameters
    ----------
    threshold : {'bos', 'gate', 'mix'} or float, optional
        ``'bos'`` (default), ``'gate'``, ``'mix'`` or the attention weight on the sink above which a query row's
        weights are constants (see :func:`attnlrp`).
    epsilon, relevance_sources, strict, layer_map, ops
        As in :func:`attnlrp`.

    Returns
    -------
    Composite
    """
    return attnlrp(epsilon=epsilon, relevance_sources=relevance_sources, strict=strict, layer_map=layer_map, ops=ops,
                   sinks=threshold)


def cp_lrp(
    *,
    epsilon: float = DEFAULT_EPSILON,
    gates: str = "constant",
    relevance_sources: bool = True,
    strict: bool = False,
    layer_map: dict | None = None,
    ops: dict | None = None,
) -> Composite:
    """A fresh Composite with the CP-LRP rules (Ali et al., ICML 2022): no relevance through gates.

    As the reference implementation (LXT) defines it, attention weights, the gates of gated
    MLPs (``act(gate_proj(x)) * up_proj(x)``: the activation's output) and the routing weights of
    mixture-of-experts layers (the outputs of their routers, :func:`is_router`) are constants:
    attention sends all relevance to the values, a gated product all of it to the ``up`` branch
    and a routed expert all of it to its output.

    Parameters
    ----------
    epsilon : float, optional
        Stabilizer of every denominator.
    gates : {'constant', 'relevant'}, optional
        ``'constant'`` (default, the reference definition) or ``'relevant'``: the gated product
        splits relevance uniformly between gate and ``up`` branch, as AttnLRP does (this
        library's CP-LRP before version 0.2; same totals, different token ranking).
    relevance_sources, strict, layer_map, ops
        As in :func:`attnlrp`.

    Returns
    -------
    Composite
    """
    return _preset(op_rules(epsilon=epsilon, cp=True, gates=gates), True, relevance_sources, strict, layer_map, ops)


def _preset(rules, cp, relevance_sources, strict, layer_map, ops) -> Composite:
    modules = transformer_layer_map(relevance_sources=relevance_sources, constant_routers=cp)
    extensions = [TransformersCheckpointing(), StateSpaceMixers()]
    if getattr(rules["attention"], "sinks", None) is not None:
        extensions += [EagerAttentionWarning(), BosSink()]
    return Composite(
        _in_front(layer_map, modules),
        ops={**rules, **(ops or {})},
        parameter_sources=EMBEDDING_PARAMETERS if relevance_sources else (),
        extensions=extensions,
        strict=strict,
        warn_unmatched=False,
    )

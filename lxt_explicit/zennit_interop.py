"""Zennit interoperability and vision presets: the only module of the library that imports Zennit.

Zennit and lxt_explicit meet in one backward pass, in both directions:

* Zennit rules are layer-map values of a :class:`~lxt_explicit.composite.Composite` through
  :class:`ZennitRule` (``{nn.Conv2d: ZennitRule(zennit.rules.Gamma(gamma=0.25))}``), Zennit
  canonizers are its ``canonizers``, and a whole Zennit composite is registered with it through
  the extension :class:`ZennitComposite` (``Composite(..., extensions=[ZennitComposite(EpsilonPlusFlat())])``);
* a :class:`~lxt_explicit.composite.Composite` follows Zennit's composite protocol (``register``,
  ``remove``, ``context``, ``handles``, ``inactive``), so it can be handed to Zennit's attributors:
  ``zennit.attribution.Gradient(model, composite)``.

Tested with Zennit 0.5.1 (what a fresh install gets on Python 3.11) and Zennit 1.0.0.

Vision presets combine the AttnLRP / CP-LRP rules for attention with Zennit's Gamma rule on the
linear and convolution layers, against gradient shattering in deep vision models (AttnLRP paper,
appendix A.2.3): :func:`vision_transformer` for Hugging Face's ``ViTForImageClassification`` and
torchvision's ``VisionTransformer`` (``vit_b_16``), :func:`convolutional` for CNNs with a Zennit
composite.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat
from zennit.image import imgify, palette
from zennit.rules import Gamma

from .composite import Composite
from .presets import EMBEDDING_PARAMETERS, op_rules, transformer_layer_map
from .rules import DropoutRule, EpsilonRule, PlainGradientRule, RelevanceSource, Rule
from .stabilizer import DEFAULT_EPSILON, check_epsilon

__all__ = [
    "ZENNIT_VERSION",
    "ZennitRule",
    "ZennitComposite",
    "ExactSequentialMergeBatchNorm",
    "vision_transformer",
    "convolutional",
    "image_heatmap",
    "VISION_PARAMETER_SOURCES",
]

#: The installed Zennit's version (the distribution's metadata: Zennit has no ``__version__``).
ZENNIT_VERSION: str = version("zennit")

#: Parameters that vision transformers add to the patch embeddings: Hugging Face ViT's class token
#: and position embeddings (see :data:`~lxt_explicit.presets.EMBEDDING_PARAMETERS`) and
#: torchvision's ``class_token`` and ``encoder.pos_embedding``.
VISION_PARAMETER_SOURCES: tuple[str, ...] = EMBEDDING_PARAMETERS + ("class_token", "encoder.pos_embedding")

#: Output layers of the vision transformers, which keep the epsilon rule (no Gamma).
_HEADS = ("classifier", "heads", "heads.*", "head")

#: Patch embeddings, the relevance sources with ``relevance_at="patches"``.
_PATCH_EMBEDDINGS = ("*embeddings.patch_embeddings", "conv_proj")


class ZennitRule(Rule):
    """A Zennit rule (``zennit.rules.Gamma(gamma=0.25)``, ...) as a layer-map value of a Composite.

    Zennit's rules compute a module's relevance with backward hooks on its input and output.
    Each matched module gets its own copy of the hook, registered with the Composite and removed
    with it; the module's own forward runs unrouted, so that the hook alone decides its relevance.

    Parameters
    ----------
    hook : zennit.core.Hook or None
        The Zennit rule; ``None`` marks a module that a Zennit composite put hooks on itself.
    """

    traced = False

    def __init__(self, hook=None):
        self.hook = hook

    def apply(self, fn, args, kwargs):
        return fn(*args, **kwargs)

    def attach(self, module) -> list:
        return list(self.hook.register(module)) if self.hook is not None else []

    def copy(self) -> "ZennitRule":
        return ZennitRule(self.hook.copy() if self.hook is not None else None)

    def options(self):
        return {"hook": type(self.hook).__name__ if self.hook is not None else "zennit composite"}

    def __repr__(self) -> str:
        if self.hook is None:
            return "zennit composite hook"
        return f"{type(self.hook).__module__}.{type(self.hook).__name__}"


class ZennitComposite:
    """A whole Zennit composite (``EpsilonPlusFlat()``, ...) registered together with a Composite.

    A :class:`~lxt_explicit.composite.Composite` extension: the Zennit composite's canonizers and
    hooks are applied after the Composite's canonizers, the modules it hooks run unrouted (the hook
    decides their relevance), and every other module and op gets the Composite's rules, in one
    backward pass.
    """

    def __init__(self, zennit_composite):
        self.zennit_composite = zennit_composite

    def register(self, model, registration) -> dict:
        before = {id(m): len(m._forward_pre_hooks) for m in model.modules()}
        self.zennit_composite.register(model)
        registration.undo.push(self.zennit_composite.remove)
        hooked = [m for m in model.modules() if len(m._forward_pre_hooks) > before.get(id(m), 0)]
        return {id(m): ZennitRule(None) for m in hooked}

    def __repr__(self) -> str:
        return f"ZennitComposite({type(self.zennit_composite).__name__})"


class ExactSequentialMergeBatchNorm(SequentialMergeBatchNorm):
    """Zennit's :class:`~zennit.canonizers.SequentialMergeBatchNorm`, exact and without traces.

    * After folding a batch norm into the preceding linear layer, Zennit 0.5.1 sets the batch
      norm's ``running_var`` to 1 but keeps its ``eps``, so the batch norm still divides by
      ``sqrt(1 + eps)`` (about 2e-2 on EfficientNet-Lite0's logits over 49 batch norms).  This
      subclass sets ``running_var`` to ``1 - eps``, which is exact (Zennit 1.0.0 sets ``eps`` to 0
      itself).
    * Zennit 1.0.0 shadows parameters with instance attributes, leaves the bias it creates for a
      bias-free layer registered after ``remove()``, and its rules reload parameters with
      ``load_state_dict(assign=True)`` (which then keeps merged weights); this subclass puts the
      original parameter and buffer objects back, so the modules are exactly as before.
    """

    @staticmethod
    def merge_batch_norm(modules, batch_norm):
        """Fold ``batch_norm`` into ``modules`` and make ``batch_norm`` the exact identity."""
        SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
        batch_norm.running_var.data = torch.full_like(batch_norm.running_var.data, 1.0 - batch_norm.eps)

    def register(self, linears, batch_norm):
        """Remember the parameter and buffer objects of the modules, then merge."""
        self.recorded = [(m, dict(m._parameters), dict(m._buffers)) for m in (*linears, batch_norm)]
        super().register(linears, batch_norm)

    def remove(self):
        """Undo the merge and everything it (or Zennit 1.0's parameter modifiers) left behind."""
        super().remove()
        for module, parameters, buffers in self.recorded:
            for store, recorded in ((module._parameters, parameters), (module._buffers, buffers)):
                for key in list(store):
                    if key not in recorded:
                        del store[key]
                for key, value in recorded.items():
                    store[key] = value
                    module.__dict__.pop(key, None)

    def copy(self):
        return type(self)()


def vision_transformer(
    *,
    method: str = "attnlrp",
    gamma: float = 0.25,
    conv_gamma: float = 0.25,
    epsilon: float = DEFAULT_EPSILON,
    relevance_at: str = "pixels",
) -> Composite:
    """AttnLRP or CP-LRP for attention, Zennit's Gamma rule on linear and convolution layers.

    For Hugging Face ``ViTForImageClassification`` / ``ViTModel`` and torchvision's
    ``VisionTransformer`` (``vit_b_16`` and relatives).  The Gamma rule goes to every ``nn.Linear``
    and ``nn.Conv2d`` module except the classifier head, which keeps the epsilon rule.  torchvision's
    attention projections are parameters of ``nn.MultiheadAttention``, not ``nn.Linear`` modules:
    they get the epsilon rule of :class:`~lxt_explicit.rules.MultiheadAttentionRule`.  The class
    token and position embeddings are relevance sources.

    Parameters
    ----------
    method : {'attnlrp', 'cp_lrp'}
        Rules for the attention weights.
    gamma : float
        Gamma of the linear layers inside the encoder.
    conv_gamma : float
        Gamma of the patch-embedding convolution.
    epsilon : float
        Stabilizer of the lxt_explicit rules and of the Gamma rules.
    relevance_at : {'pixels', 'patches'}
        Where the relevance is collected: at the image (make ``pixel_values`` require a gradient
        and read its ``.grad``) or at the patch embeddings (a relevance source; read
        :meth:`~lxt_explicit.composite.Composite.source_relevance`).

    Returns
    -------
    Composite
    """
    epsilon = check_epsilon(epsilon)
    if method not in ("attnlrp", "cp_lrp"):
        raise ValueError(f"method must be 'attnlrp' or 'cp_lrp', got {method!r}")
    if relevance_at not in ("pixels", "patches"):
        raise ValueError(f"relevance_at must be 'pixels' or 'patches', got {relevance_at!r}")
    layer_map: dict = {}
    if relevance_at == "patches":
        for pattern in _PATCH_EMBEDDINGS:
            layer_map[pattern] = RelevanceSource
    for pattern in _HEADS:
        layer_map[pattern] = None
    layer_map[nn.Conv2d] = ZennitRule(Gamma(gamma=conv_gamma, stabilizer=epsilon))
    layer_map[nn.Linear] = ZennitRule(Gamma(gamma=gamma, stabilizer=epsilon))
    layer_map.update(transformer_layer_map())
    return Composite(
        layer_map,
        ops=op_rules(epsilon=epsilon, cp=method == "cp_lrp"),
        parameter_sources=VISION_PARAMETER_SOURCES,
        warn_unmatched=False,
    )


#: Operations that Zennit's composites leave to the gradient (they hook modules): element-wise functions
#: called as functions, layer norms, products (layer scales, squeeze-and-excitation gates), means and
#: written-out normalizations.  :func:`convolutional` gives them the AttnLRP rules.
_ELEMENT_WISE_OPS = (
    "activation", "layer_norm", "rms_norm", "normalize", "mul", "div", "neg", "mean", "sum", "pow", "root",
    "variance", "norm",
)


def convolutional(
    zennit_composite=None, *, residual_rule: bool = True, epsilon: float = DEFAULT_EPSILON, ops: dict | None = None
) -> Composite:
    """A Zennit composite for a CNN, registered through lxt_explicit (one backward pass).

    The modules the Zennit composite hooks (convolutions, linear layers, activation and pooling
    modules, batch norms) get its rules; residual sums, dropout and the operations Zennit leaves
    to the gradient (layer norms, products such as ConvNeXt's layer scale or EfficientNet's
    squeeze-and-excitation gates, functional activations, means, written-out normalizations) get
    the AttnLRP rules of :func:`~lxt_explicit.presets.op_rules`.

    Parameters
    ----------
    zennit_composite : zennit.core.Composite, optional
        Default: ``EpsilonPlusFlat`` with :class:`ExactSequentialMergeBatchNorm` as canonizer.
    residual_rule : bool
        Give residual sums (``x + f(x)``) the epsilon rule.  With ``False`` they keep the plain
        gradient, which passes the whole relevance to both summands, as Zennit alone does; the
        result then equals Zennit alone for networks made of the modules Zennit hooks and residual
        sums (ResNets).  Either way, with ``EpsilonPlusFlat`` little relevance reaches the pixels
        of a network with merged batch norms: the ZPlus rule keeps the positive (merged) biases in
        its denominators, so every convolution absorbs a share.
    epsilon : float
        Stabilizer of the residual sums and of the AttnLRP rules.
    ops : dict, optional
        Op rules that replace or extend these (keys as in :class:`~lxt_explicit.composite.Composite`).

    Returns
    -------
    Composite
    """
    epsilon = check_epsilon(epsilon)
    if zennit_composite is None:
        zennit_composite = EpsilonPlusFlat(canonizers=[ExactSequentialMergeBatchNorm()])
    element_wise = {name: rule for name, rule in op_rules(epsilon=epsilon).items() if name in _ELEMENT_WISE_OPS}
    rules = {
        **element_wise,
        "add": EpsilonRule(epsilon=epsilon) if residual_rule else PlainGradientRule(),
        "dropout": DropoutRule(),
        **(ops or {}),
    }
    return Composite(ops=rules, extensions=[ZennitComposite(zennit_composite)], warn_unmatched=False)


def image_heatmap(relevance: torch.Tensor, path: str | Path, *, cmap: str = "coldnhot", level: float = 1.0) -> Path:
    """Save a relevance map of an image as PNG with Zennit's image tools.

    Parameters
    ----------
    relevance : torch.Tensor
        ``(1, C, H, W)``, ``(C, H, W)`` or ``(H, W)``; channels are summed.
    path : str or Path
        Output file.
    cmap : str
        A Zennit colour map (``'coldnhot'``, ``'bwr'``, ``'france'``, ...); diverging and
        symmetric around zero.
    level : float
        Contrast: values beyond ``max|R| / level`` saturate.

    Returns
    -------
    Path
    """
    heat = relevance.detach().float().cpu()
    while heat.dim() > 3:
        heat = heat[0]
    if heat.dim() == 3:
        heat = heat.sum(0)
    if not torch.isfinite(heat).all():
        raise ValueError("the relevance map has NaN or infinite values")
    image = imgify(heat.numpy(), symmetric=True, cmap=cmap, level=level)
    # Zennit hands Pillow its palette as a NumPy array, which Pillow 11+ cannot write; pass bytes.
    image.putpalette(np.asarray(palette(cmap, level), dtype=np.uint8).tobytes())
    path = Path(path)
    image.save(path)
    return path

"""Sparse-autoencoder features as latent units: insert a user's autoencoder at a site, reversibly.

``with insert_sae(model, "model.layers.3", sae):`` replaces the output ``x`` of module
``model.layers.3`` (a residual stream, an MLP's output, ...) by

.. math:: y = \\mathrm{decode}(f) + e, \\qquad f = \\mathrm{encode}(x), \\qquad e = x - \\mathrm{decode}(f),

so the model computes the same values (up to rounding), and the features ``f`` are latent units
like neurons: ``explain(..., latent=["sae:model.layers.3"])`` records their relevance, and
:func:`~lxt_explicit.neurons.steer` edits them (``e`` is computed from the unsteered features, so
a steered feature changes the output).

Relevance under the presets' rules: the sum ``decode(f) + e`` splits the site's relevance
between the reconstruction and the error term (epsilon rule, their shares of the sum); the
decoder (linear: epsilon rule) passes the reconstruction's relevance to the features, its bias
keeping its own share; the encoder's non-linearity passes relevance unchanged (identity rule, as
for activations in AttnLRP) and its linear map (epsilon rule) on to ``x``.  The error term is a
branch of its own: its relevance is read as ``'sae:SITE:error'`` and passed on to ``x`` unchanged,
so the tokens keep the relevance that the features do not explain.  Per position, the site's
relevance equals the features' plus the error's plus the decoder bias's share
(:func:`sae_relevance`).

The block is added as a submodule named :data:`~lxt_explicit.latent.SAE_CHILD` of the site module
(so a Composite registered afterwards sees it and its linear layers and activation get their
rules) with a forward hook on the site; leaving the ``with`` block removes both.  Insert the
autoencoder before registering a Composite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as lf
from ..latent import SAE_CHILD

__all__ = ["SparseAutoencoder", "SAEInsertion", "insert_sae", "as_autoencoder", "sae_relevance"]


class SparseAutoencoder(nn.Module):
    """A ReLU sparse autoencoder: ``encode(x) = relu(W_e x + b_e)``, ``decode(f) = W_d f + b_d``.

    Parameters
    ----------
    width : int
        Size of the activations it encodes (the site's last dimension).
    features : int
        Number of features.
    decoder_bias : bool
        Give the decoder a bias.
    """

    def __init__(self, width: int, features: int, *, decoder_bias: bool = True):
        super().__init__()
        self.encoder = nn.Linear(width, features)
        self.decoder = nn.Linear(features, width, bias=decoder_bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The features, ``relu(W_e x + b_e)``."""
        return F.relu(self.encoder(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """The reconstruction, ``W_d f + b_d``."""
        return self.decoder(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class _TwoLinear(nn.Module):
    """An encoder and a decoder linear layer as an autoencoder with a ReLU between them."""

    def __init__(self, encoder: nn.Linear, decoder: nn.Linear):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def encode(self, x):
        return F.relu(self.encoder(x))

    def decode(self, f):
        return self.decoder(f)


def as_autoencoder(sae) -> nn.Module:
    """``sae`` as a module with ``encode`` and ``decode``.

    Accepted: an ``nn.Module`` with ``encode`` and ``decode`` methods, a pair ``(encoder,
    decoder)`` of ``nn.Linear`` layers, or an ``nn.Module`` whose only children are two
    ``nn.Linear`` layers (encoder first); the last two get a ReLU between them.

    Raises
    ------
    TypeError
        For anything else.
    """
    if isinstance(sae, nn.Module) and callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None)):
        return sae
    layers = list(sae.children()) if isinstance(sae, nn.Module) else list(sae) if isinstance(sae, (tuple, list)) else []
    if len(layers) == 2 and all(isinstance(layer, nn.Linear) for layer in layers):
        return _TwoLinear(*layers)
    raise TypeError(
        "a sparse autoencoder is an nn.Module with encode(x) and decode(f) methods, a pair (encoder, decoder) of "
        f"nn.Linear layers, or a module made of exactly two nn.Linear layers; got {type(sae).__name__}"
    )


class _Point(nn.Module):
    """A named point of the block (features, reconstruction, error): returns its input, hooks attach here."""

    def __init__(self, units: int | None = None):
        super().__init__()
        self.units = units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _SAEBlock(nn.Module):
    def __init__(self, sae: nn.Module, features: int | None):
        super().__init__()
        self.sae = sae
        self.features = _Point(features)
        self.reconstruction = _Point()
        self.error = _Point()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean = self.sae.encode(x)
        with torch.no_grad():
            unsteered = self.sae.decode(clean.detach())
        error = lf.identity(lambda value: value - unsteered, x)  # its relevance passes on to x unchanged
        reconstruction = self.reconstruction(self.sae.decode(self.features(clean)))
        return reconstruction + self.error(error)


def _feature_count(sae: nn.Module) -> int | None:
    for name in ("decoder", "W_dec"):
        layer = getattr(sae, name, None)
        if isinstance(layer, nn.Linear):
            return layer.in_features
    encoder = getattr(sae, "encoder", None)
    return encoder.out_features if isinstance(encoder, nn.Linear) else None


def _check_dtype(model: nn.Module, sae: nn.Module) -> None:
    ours = next(iter(model.parameters()), None)
    theirs = next(iter(sae.parameters()), None)
    if ours is not None and theirs is not None and (ours.dtype, ours.device) != (theirs.dtype, theirs.device):
        raise ValueError(
            f"the autoencoder is {theirs.dtype} on {theirs.device} but the model {ours.dtype} on {ours.device}; "
            f"convert it first: sae.to(dtype={ours.dtype}, device='{ours.device}')"
        )


class SAEInsertion:
    """An autoencoder inserted at a site (the context manager :func:`insert_sae` returns)."""

    def __init__(self, model: nn.Module, site: str, sae):
        if not isinstance(model, nn.Module):
            raise TypeError(f"insert_sae needs an nn.Module, got {type(model).__name__}")
        try:
            self.module = model.get_submodule(site)
        except AttributeError:
            raise ValueError(f"no module named {site!r} in {type(model).__name__}; give a module name") from None
        if getattr(model.__dict__.get("forward"), "__lxt_composite__", None) is not None:
            raise RuntimeError("a Composite is registered on the model: insert the autoencoder first, then register")
        if SAE_CHILD in self.module._modules:
            raise RuntimeError(f"an autoencoder is already inserted at {site!r}; remove it first")
        self.model, self.site = model, site
        autoencoder = as_autoencoder(sae)
        _check_dtype(model, autoencoder)
        self.block = _SAEBlock(autoencoder, _feature_count(autoencoder))
        self.spec = f"sae:{site}"
        self._hook = None

    def __enter__(self) -> "SAEInsertion":
        if self._hook is not None:
            raise RuntimeError("this autoencoder is already inserted")
        self.module.add_module(SAE_CHILD, self.block)
        self._hook = self.module.register_forward_hook(self._replace)
        return self

    def _replace(self, module, args, output):
        if isinstance(output, torch.Tensor):
            return self.block(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (self.block(output[0]), *output[1:])
        raise TypeError(f"the output of {self.site!r} is {type(output).__name__}; an autoencoder needs a tensor")

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def remove(self) -> None:
        """Take the autoencoder out again (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.module._modules.pop(SAE_CHILD, None)


def insert_sae(model: nn.Module, site: str, sae) -> SAEInsertion:
    """Insert ``sae`` at the output of module ``site`` for the duration of a ``with`` block.

    Parameters
    ----------
    model : nn.Module
        The model (insert before registering a Composite on it).
    site : str
        Name of the module whose output is encoded (``'model.layers.3'`` for the residual stream
        after block 3, ``'model.layers.3.mlp'`` for its MLP's output).
    sae : nn.Module or (nn.Linear, nn.Linear)
        The autoencoder (see :func:`as_autoencoder`), in the model's dtype and device.

    Returns
    -------
    SAEInsertion
        Its ``spec`` (``'sae:SITE'``) names the features for ``explain(latent=...)``,
        :func:`~lxt_explicit.neurons.steer` and the other tools of :mod:`lxt_explicit.neurons`.
    """
    return SAEInsertion(model, site, sae)


def sae_relevance(latent: dict, site: str) -> dict[str, torch.Tensor]:
    """The relevance terms of an autoencoder at ``site`` per position, from an explanation's ``latent``.

    ``latent`` must hold ``'sae:SITE'``, ``'sae:SITE:error'`` and ``'sae:SITE:reconstruction'``
    (pass all three to ``explain(latent=...)``).  Returns ``features`` (``[positions, features]``),
    ``error`` and ``bias`` (``[positions]``, the decoder bias's share: reconstruction minus
    features) and ``total`` (their sum: the relevance of the site's output).
    """
    names = {part: f"sae:{site}" + ("" if part == "features" else f":{part}")
             for part in ("features", "error", "reconstruction")}
    missing = [name for name in names.values() if name not in latent]
    if missing:
        raise KeyError(f"the explanation has no relevance for {missing}; pass them in explain(latent=[...])")
    features = latent[names["features"]]
    error = latent[names["error"]].sum(-1)
    bias = latent[names["reconstruction"]].sum(-1) - features.sum(-1)
    return {"features": features, "error": error, "bias": bias, "total": features.sum(-1) + error + bias}

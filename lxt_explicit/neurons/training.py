"""A small training routine for a :class:`~lxt_explicit.neurons.sae.SparseAutoencoder` on a model's activations."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .sae import SparseAutoencoder

__all__ = ["site_activations", "train_sae"]


def site_activations(model: nn.Module, tokenizer, texts: Iterable[str], site: str, *, max_length: int = 64):
    """The output of module ``site`` at every token of ``texts``, ``[tokens, width]`` (detached)."""
    module = model.get_submodule(site)
    rows = []

    def keep(m, args, output):
        rows.append((output[0] if isinstance(output, tuple) else output).detach().flatten(0, -2))

    handle = module.register_forward_hook(keep)
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        handle.remove()
    if not rows:
        raise ValueError("no texts given: site_activations needs at least one text")
    return torch.cat(rows)


def train_sae(
    activations: torch.Tensor,
    features: int,
    *,
    l1: float = 1e-3,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> SparseAutoencoder:
    """Train a ReLU sparse autoencoder on ``activations`` (``[samples, width]``) with Adam.

    The loss is the mean squared reconstruction error plus ``l1`` times the mean L1 norm of the
    features scaled by the decoder columns' norms.  Returns the autoencoder in evaluation mode, in
    the activations' dtype.
    """
    if activations.dim() != 2 or len(activations) == 0:
        raise ValueError(f"activations must be [samples, width] with samples > 0, got {tuple(activations.shape)}")
    generator = torch.Generator().manual_seed(seed)
    data = activations.detach().float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = SparseAutoencoder(data.shape[-1], features)
    with torch.no_grad():
        sae.decoder.bias.copy_(data.mean(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (min(batch_size, len(data)),), generator=generator)]
        codes = sae.encode(batch)
        loss = (sae.decode(codes) - batch).pow(2).mean() + l1 * (codes * sae.decoder.weight.norm(dim=0)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.to(activations.dtype).eval()

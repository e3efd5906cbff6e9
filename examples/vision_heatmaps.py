"""Heatmaps of EfficientNet-Lite0 (real ImageNet weights) on two natural photos from scikit-image.

For each photo and its top-1 class, three explanations in one backward pass each:

* ``zennit``: Zennit's EpsilonPlusFlat composite with exact batch-norm merging, registered alone;
* ``through_lxt``: the same Zennit composite registered through lxt_explicit (must equal ``zennit``);
* ``lxt_residual``: as above plus lxt_explicit's epsilon rule on the residual sums of the MBConv blocks.

Usage: ``python examples/vision_heatmaps.py`` (writes ``examples/heatmaps/*.png`` and prints numbers).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import skimage.data
import torch
from PIL import Image
from zennit.composites import EpsilonPlusFlat

from lxt_explicit.models.efficientnet import efficientnet_lite0, imagenet_categories, preprocess
from lxt_explicit.zennit_interop import ExactSequentialMergeBatchNorm, convolutional, image_heatmap

OUT = Path(__file__).resolve().parent / "heatmaps"


def explain(model, image, target, composite):
    x = image.clone().requires_grad_()
    with composite.context(model):
        out = model(x)
        out.backward(torch.eye(out.shape[-1])[[target]] * out.detach())
    return x.grad


def main() -> None:
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    model = efficientnet_lite0()
    categories = imagenet_categories()
    make = lambda: EpsilonPlusFlat(canonizers=[ExactSequentialMergeBatchNorm()])  # noqa: E731
    for name, photo in (("chelsea", skimage.data.chelsea()), ("coffee", skimage.data.coffee())):
        image = preprocess(photo)
        with torch.no_grad():
            probabilities = model(image).softmax(-1)[0]
        target = int(probabilities.argmax())
        Image.fromarray(((image[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(
            OUT / f"{name}_input.png"
        )
        maps = {
            "zennit": explain(model, image, target, make()),
            "through_lxt": explain(model, image, target, convolutional(make(), residual_rule=False)),
            "lxt_residual": explain(model, image, target, convolutional(make(), residual_rule=True)),
        }
        same = (maps["through_lxt"] - maps["zennit"]).abs().max() / maps["zennit"].abs().max()
        print(f"{name}: {categories[target]} ({probabilities[target]:.2f}); through lxt vs Zennit alone: "
              f"max relative difference {same:.1e}")
        for method, relevance in maps.items():
            heat = relevance[0].sum(0)
            centre = heat[56:168, 56:168].abs().sum() / heat.abs().sum()
            print(f"  {method:>13}: total {float(relevance.sum()):+.3f}, positive share "
                  f"{float(heat.clamp(min=0).sum() / heat.abs().sum()):.2f}, central half of the image holds "
                  f"{float(centre):.2f} of |R|")
            image_heatmap(relevance, OUT / f"{name}_{method}.png")


if __name__ == "__main__":
    main()

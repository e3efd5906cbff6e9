"""The support matrix as data (JSON) and as a page (Markdown), and its summary sentence."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from .checks import CONSERVATION_TOLERANCE, FamilyRecord

__all__ = ["Sweep", "summary", "render_markdown", "unhandled_ops", "gaps_by_op", "SUMMARY_PATTERN"]

#: The summary sentence, as :func:`summary` writes it.
SUMMARY_PATTERN = re.compile(r"(\d+) of (\d+) families verified")


@dataclass
class Sweep:
    """The records of one run, with the versions it ran with."""

    records: list[FamilyRecord]
    transformers: str
    torch: str
    seconds: float = 0.0
    command: str = ""

    def to_dict(self) -> dict:
        """Plain Python data (for JSON)."""
        return {
            "transformers": self.transformers,
            "torch": self.torch,
            "seconds": self.seconds,
            "command": self.command,
            "records": [record.to_dict() for record in self.records],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Sweep":
        """The sweep :meth:`to_dict` gave."""
        records = [FamilyRecord.from_dict(item) for item in data["records"]]
        return cls(records, data["transformers"], data["torch"], data.get("seconds", 0.0), data.get("command", ""))

    def save(self, path: str | Path) -> None:
        """Write the sweep as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Sweep":
        """Read a sweep written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def counts(self) -> Counter:
        """Families per status."""
        return Counter(record.status for record in self.records)


def summary(sweep: Sweep) -> str:
    """``"N of M families verified"``: M counts the families built here."""
    counts = sweep.counts()
    built = counts["verified"] + counts["gaps"]
    return f"{counts['verified']} of {built} families verified"


def _op(entry: str) -> str:
    """``"torch.topk (MixtralTopKRouter)"`` -> ``"torch.topk"``."""
    return entry.split(" (", 1)[0]


def unhandled_ops(sweep: Sweep) -> Counter:
    """Operation -> number of families with it on the relevance path and no rule (either preset)."""
    counts: Counter = Counter()
    for record in sweep.records:
        counts.update({_op(entry) for entries in record.unhandled.values() for entry in entries})
    return counts


def gaps_by_op(sweep: Sweep) -> dict[str, list[str]]:
    """Operation -> the families (with gaps) that lack a rule for it, most common operation first."""
    found: dict[str, set] = defaultdict(set)
    for record in sweep.records:
        for entries in record.unhandled.values():
            for entry in entries:
                found[_op(entry)].add(record.family)
    return {op: sorted(families) for op, families in sorted(found.items(), key=lambda item: (-len(item[1]), item[0]))}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _details(record: FamilyRecord) -> str:
    kinds = ", ".join(record.kinds) or "no attention"
    measured = f"{record.attention}; {kinds}"
    if record.conservation is not None:
        measured += f"; conservation {record.conservation:.1e} ({record.conservation_dtype})"
    if record.status == "verified":
        return measured
    return f"{'; '.join(record.gaps)} [{measured}]"


def _header(sweep: Sweep) -> list[str]:
    counts = sweep.counts()
    return [
        "# Support matrix",
        "",
        "Measured, not written: `python -m lxt_explicit.support` builds a tiny configuration (2 layers, hidden size "
        "32, vocabulary 128, 4 experts with 2 per token, fixed seed) of every model type in the installed "
        "transformers' causal-LM, masked-LM, sequence-to-sequence-LM and image-classification auto mappings and "
        f"checks AttnLRP and CP-LRP on it (transformers {sweep.transformers}, torch {sweep.torch}"
        + (f"; `{sweep.command}`, {sweep.seconds / 60:.0f} min" if sweep.command else "") + ").",
        "",
        f"**{summary(sweep)}**; {counts['gaps']} built with gaps, {counts['not buildable']} not buildable here.",
        "",
        "A family is *verified* when, for both presets, no operation on the relevance path lacks a rule "
        "(`lxt_explicit.diagnostics.audit`) and the output is bit-equal with the rules registered; when CP-LRP "
        "relevance at the sources and inputs sums to the explained logit on a copy with every bias zeroed "
        f"(float64 where the model runs in it, epsilon 1e-12; relative error <= {CONSERVATION_TOLERANCE:g}); "
        "and when AttnLRP relevance is finite in bfloat16. Explained: the largest logit at the last position "
        "(causal LM), at the masked position (masked LM), at the first decoder position (sequence-to-sequence), "
        "or of the image (classification). A family in several mappings is checked on the first of "
        "sequence-to-sequence, masked LM, causal LM, image classification.",
        "",
    ]


def _op_table(sweep: Sweep) -> list[str]:
    by_op = gaps_by_op(sweep)
    if not by_op:
        return []
    lines = ["## Operations without a rule", "", "| operation | families | which |", "|---|---|---|"]
    for op, families in by_op.items():
        lines.append(f"| `{_cell(op)}` | {len(families)} | {', '.join(families)} |")
    return lines + [""]


def render_markdown(sweep: Sweep) -> str:
    """``docs/support.md``: summary, one row per family built here, the operations without a rule,
    and the families not buildable here with the reason."""
    built = [r for r in sweep.records if r.status != "not buildable"]
    unbuilt = [r for r in sweep.records if r.status == "not buildable"]
    lines = _header(sweep)
    lines += ["## Families built here", "", "| family | task | status | details |", "|---|---|---|---|"]
    lines += [f"| {r.family} | {r.task} | {r.status} | {_cell(_details(r))} |" for r in built]
    lines += [""] + _op_table(sweep)
    lines += ["## Not buildable here", "", "| family | task | stage | reason |", "|---|---|---|---|"]
    lines += [f"| {r.family} | {r.task} | {r.stage} | {_cell(r.reason)} |" for r in unbuilt]
    return "\n".join(lines) + "\n"

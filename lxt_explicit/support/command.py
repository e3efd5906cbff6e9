"""The command ``python -m lxt_explicit.support``: run the sweep, write the JSON and the Markdown page.

Examples
--------
The whole matrix (a few minutes on one CPU thread), as committed::

    OMP_NUM_THREADS=1 python -m lxt_explicit.support --output docs/support.md --json benchmarks/results/support.json

Re-check a few families after adding rules, keeping the other records::

    python -m lxt_explicit.support --families mixtral,qwen3_moe --update \\
        --output docs/support.md --json benchmarks/results/support.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checks import check_family
from .report import Sweep, render_markdown, summary, unhandled_ops
from .tasks import families

__all__ = ["main", "run_sweep"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lxt_explicit.support",
        description="Measure which transformers families AttnLRP and CP-LRP cover (tiny configurations).",
    )
    parser.add_argument("--families", help="comma-separated model types (default: every family of the four mappings)")
    parser.add_argument("--output", type=Path, help="write the Markdown page here (e.g. docs/support.md)")
    parser.add_argument("--json", type=Path, help="write the records here (e.g. benchmarks/results/support.json)")
    parser.add_argument("--update", action="store_true",
                        help="replace only the checked families' records in the existing --json file")
    parser.add_argument("--from-json", action="store_true", help="run nothing: render --output from --json")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per family (default 120)")
    return parser


def run_sweep(model_types: list[str] | None = None, *, timeout: float | None = 120.0, progress=None) -> Sweep:
    """Check ``model_types`` (default: every family of :func:`~lxt_explicit.support.tasks.families`).

    Parameters
    ----------
    model_types : list of str, optional
        Model types to check; each must be in one of the four auto mappings.
    timeout : float, optional
        Seconds per family.
    progress : callable, optional
        Called with each :class:`~lxt_explicit.support.checks.FamilyRecord` as it is done.

    Returns
    -------
    Sweep

    Raises
    ------
    ValueError
        If a model type is in none of the mappings.
    """
    import torch
    import transformers

    known = families()
    chosen = list(known) if model_types is None else list(model_types)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(
            f"not in the causal-LM, masked-LM, seq2seq-LM or image-classification auto mappings of transformers "
            f"{transformers.__version__}: {unknown}; choose among: {', '.join(known)}"
        )
    start = time.perf_counter()
    records = []
    for name in chosen:
        records.append(check_family(name, known[name], timeout=timeout))
        if progress is not None:
            progress(records[-1])
    return Sweep(records, transformers.__version__, torch.__version__.split("+")[0], time.perf_counter() - start)


def _merged(sweep: Sweep, path: Path) -> Sweep:
    """``sweep``'s records in place of the same families' records of the sweep saved at ``path``."""
    previous = Sweep.load(path)
    fresh = {record.family: record for record in sweep.records}
    records = [fresh.pop(record.family, record) for record in previous.records] + list(fresh.values())
    records.sort(key=lambda record: record.family)
    return Sweep(records, sweep.transformers, sweep.torch, previous.seconds, previous.command)


def _print_progress(record) -> None:
    detail = record.reason if record.status == "not buildable" else "; ".join(record.gaps)
    print(f"{record.family:28s} {record.status:14s} {record.seconds:6.1f}s  {detail[:160]}", file=sys.stderr,
          flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    if (args.update or args.from_json) and args.json is None:
        _parser().error("--update and --from-json need --json")
    if args.from_json:
        sweep = Sweep.load(args.json)
    else:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()  # this process prints the matrix, not model warnings
        chosen = [name.strip() for name in args.families.split(",") if name.strip()] if args.families else None
        try:
            sweep = run_sweep(chosen, timeout=args.timeout, progress=_print_progress)
        except ValueError as error:
            _parser().error(str(error))
        sweep.command = " ".join(["python -m lxt_explicit.support", *(sys.argv[1:] if argv is None else argv)])
        if args.update:
            sweep = _merged(sweep, args.json)
        if args.json is not None:
            sweep.save(args.json)
    if args.output is not None:
        args.output.write_text(render_markdown(sweep))
    common = ", ".join(f"{op} ({count})" for op, count in unhandled_ops(sweep).most_common(8))
    print(f"{summary(sweep)}; {sweep.counts()['not buildable']} not buildable here. Most common ops without a rule: "
          f"{common or 'none'}")
    return 0

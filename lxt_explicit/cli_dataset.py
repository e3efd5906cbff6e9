"""``lxt-explicit explain-dataset``: explain every row of a JSON Lines file (see :mod:`lxt_explicit.dataset`).

``lxt-explicit explain-dataset INPUT.jsonl --output OUTPUT.jsonl`` explains each row's prompt (with
its ``target``, ``contrast`` or ``continuation``) in batches, writes one output row per line, and
resumes when run again with the same output.  ``--report REPORT.html`` also writes one HTML page
with a summary and every row's heatmap (:mod:`lxt_explicit.report`).  Under ``accelerate launch``
the same command runs data-parallel, one shard per process, merged at the end.

The input file, the options and the output paths are checked before the model is loaded; a
mistake prints one line and exits with code 2 (as every ``lxt-explicit`` command does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(commands, *, positive, dtypes, default_model: str) -> None:
    """Add the ``explain-dataset`` subcommand to the subparsers ``commands`` of the ``lxt-explicit`` parser."""
    command = commands.add_parser("explain-dataset", help="explain every row of a JSON Lines file (resumable)")
    command.add_argument("input", type=Path, metavar="INPUT.jsonl",
                         help='one JSON object per line: {"prompt": ..., "target"?, "contrast"?, "continuation"?, '
                              '"id"?}')
    command.add_argument("--output", type=Path, required=True, metavar="OUTPUT.jsonl",
                         help="output rows (continued if it exists: rows already there are skipped)")
    command.add_argument("--model", type=Path, help=f"a local Hugging Face model folder (default: {default_model})")
    command.add_argument("--method", choices=("attnlrp", "attnlrp_sinks", "cp_lrp"), default="attnlrp")
    command.add_argument("--dtype", choices=dtypes, default="float32")
    command.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu; under accelerate launch: the "
                                          "process's device)")
    command.add_argument("--batch-size", type=positive, default=8, help="rows per forward and backward pass")
    command.add_argument("--per-token", action="store_true",
                         help="explain every token of each answer: the relevance of every earlier token for it")
    command.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    command.add_argument("--max-new-tokens", type=positive,
                         help="explain the model's generated answer (rows without target or continuation)")
    command.add_argument("--report", type=Path, metavar="REPORT.html", help="also write an HTML report of all rows")
    command.add_argument("--scale-without-special", action="store_true",
                         help="in the report, leave special tokens out of each heatmap's colour scale")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_input(path: Path) -> list[dict]:
    """The rows of the input file; a file that cannot be read or a line that is not a JSON object is a UsageError."""
    from .cli import UsageError

    if not path.exists():
        raise UsageError(f"{path} does not exist; give a JSON Lines file with one row per line")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give a JSON Lines file with one row per line")
    rows = []
    try:
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    rows.append(_parse(line, number, path))
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; save it as UTF-8 JSON Lines") from None
    except OSError as error:
        raise UsageError(f"{path} cannot be read ({error.strerror}); check its permissions") from None
    if not rows:
        raise UsageError(f'{path} has no rows; write one JSON object per line, e.g. {{"prompt": "The capital of"}}')
    _check_ids(rows, path)
    return rows


def _check_ids(rows: list[dict], path: Path) -> None:
    """Ids are strings or integers, one per row (checked before any work, as the run would stop at a duplicate)."""
    from .cli import UsageError
    from .dataset import row_key

    seen = {}
    for index, row in enumerate(rows):
        row_id = index if row.get("id") is None else row["id"]
        try:
            key = row_key(row_id)
        except ValueError as error:
            raise UsageError(f"{path} row {index}: {error}") from None
        if key in seen:
            raise UsageError(f"{path}: rows {seen[key]} and {index} have the same id {row_id!r}; give each row its "
                             "own id (they identify the rows when a run is resumed), or none (the index is used)")
        seen[key] = index


def _parse(line: str, number: int, path: Path) -> dict:
    from .cli import UsageError

    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UsageError(f"{path} line {number} is not JSON ({error.msg}); write one JSON object per line") from None
    if not isinstance(row, dict):
        raise UsageError(f'{path} line {number} is a {type(row).__name__}, not an object; write e.g. {{"prompt": ...}}')
    return row


def _check_paths(args) -> None:
    from .cli import UsageError

    if args.output.resolve() == args.input.resolve():
        raise UsageError("--output is the input file; give another file for the explained rows")
    for flag, path in (("--output", args.output), ("--report", args.report)):
        if path is None:
            continue
        if path.is_dir():
            raise UsageError(f"{flag} {path} is a folder; give a file path")
        existing = path.absolute().parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise UsageError(f"{flag} {path}: cannot write in {existing}; give a path in a folder you can write to")


def _device(args) -> str:
    if args.device is not None:
        return args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .runfiles import process_group

        return str(process_group()[2].device)
    return "cpu"


def run(args) -> int:
    """Run the command (arguments parsed by the ``lxt-explicit`` parser); returns the exit code."""
    import torch

    from .cli import UsageError, _check_device, _load
    from .dataset import check_options, explain_dataset, read_rows

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = read_input(args.input)
    _check_paths(args)
    options = {"method": args.method, "chat": args.chat}
    if args.max_new_tokens is not None:
        options["max_new_tokens"] = args.max_new_tokens
    try:
        check_options(options, args.per_token)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    device = _device(args)
    _check_device(device)
    model, tokenizer, description = _load(args.model, args.dtype, device)
    try:
        summary = explain_dataset(model, tokenizer, rows, args.output, batch_size=args.batch_size,
                                  per_token=args.per_token, progress=not args.no_progress, **options)
    except ValueError as error:  # the options or the rows as a whole (duplicate ids), not one row
        raise UsageError(str(error).replace("chat=True", "--chat")) from None
    if summary.process != 0:
        return 0
    written = read_rows(args.output)
    _print_summary(args, description, device, summary, written)
    if args.report is not None:
        from .report import write_report

        write_report(written, args.report, title=f"{args.input.name}: {description['name']}, {args.method}",
                     exclude_special=args.scale_without_special)
        print(f"wrote {args.report}")
    return 0


def _print_summary(args, description: dict, device: str, summary, written: list[dict]) -> None:
    from .report import dataset_summary

    stats = dataset_summary(written)
    where = "" if summary.processes == 1 else f" (process 0 of {summary.processes})"
    print(f"model: {description['name']} ({args.dtype}, {device}), method: {args.method}, "
          f"{summary.processes} process(es)")
    print(f"explained {summary.explained} rows{where} in {summary.seconds:.1f} s, skipped {summary.skipped} already "
          f"in {args.output}; {stats['rows']} rows there, {len(stats['errors'])} with an error")
    first, special = stats["first_token_share"], stats["special_token_share"]
    if first["count"]:
        on_special = "n/a" if special["mean"] is None else f"{special['mean']:.3f}"
        print(f"relevance share on the first token: mean {first['mean']:.3f}, median {first['median']:.3f}; "
              f"on special tokens: mean {on_special}")
    ranks = stats["answer_ranks"]
    if ranks["count"]:
        print(f"answer ranks of the {ranks['count']} rows with a target: mean {ranks['mean']:.2f}, "
              f"ranked first {100 * ranks['top1']:.1f}%")
    for error in stats["errors"][:5]:
        print(f"  row {error['id']!r}: {error['error']}")

"""Explain whole datasets: rows in, rows with their explanation out.

:func:`explain_rows` explains any iterable of rows (dicts, a ``datasets.Dataset``, parsed JSON
Lines) in batches and yields one output row per input row; :func:`explain_dataset` writes them to
a JSON Lines file, resumably, on one process or data-parallel under ``accelerate launch``.

An input row has a ``"prompt"`` and optionally a ``"target"`` and a ``"contrast"`` (a token id or a
string that is one token), a ``"continuation"`` (text after the prompt, explained at the sentence
level) and an ``"id"`` (default: the row's index; ids must be unique).  An output row is the input
row with its ``"id"`` and two fields:

* ``"explanation"``: :meth:`Explanation.to_dict() <lxt_explicit.explanation.Explanation.to_dict>`
  (tokens, relevance, target, target value, conservation, ...) with ``"relevance_shares"`` (the
  share of the absolute relevance on the first token and on special tokens,
  :mod:`lxt_explicit.sinks`) and, for rows with a target, ``"answer_rank"`` (the rank of the target
  among the model's next-token logits, 1 = the most likely); ``None`` if the row failed;
* ``"error"``: ``None``, or ``"ErrorType: message"`` when the row could not be explained (the run
  goes on with the next row).

With ``per_token=True`` every row's answer is explained token by token instead
(:func:`per_token_output`: the relevance matrix and the sum of its rows).

The rows of a batch that explain the next token are explained in one padded forward and backward
pass, each with its own target and contrast (the results equal those of one row at a time; rows
with a continuation are explained one at a time).  A batch that fails is explained again row by
row, so that an error is recorded in the row that caused it.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Mapping

import torch

from .explain import METHODS, explain
from .per_token import explain_tokens
from .runfiles import RunFiles, complete_lines
from .sinks import json_shares, sink_shares, special_positions
from .targets import needed_logits

__all__ = ["RunSummary", "answer_ranks", "check_options", "explain_dataset", "explain_rows", "read_rows", "row_key",
           "to_json_line"]

#: Keys of an input row that say what to explain (other keys are copied to the output row as they are);
#: ``explain`` takes them from each row, not from the options of a run.
REQUEST_KEYS = ("prompt", "target", "contrast", "continuation")


@dataclass
class RunSummary:
    """What a run of :func:`explain_dataset` did (in this process).

    Attributes
    ----------
    output : str
        The JSON Lines file.
    explained : int
        Rows explained and written by this run (errors included).
    skipped : int
        Rows skipped because the output already held them (resume).
    errors : int
        Rows of this run that could not be explained (their ``"error"`` says why).
    seconds : float
        Wall time of the run.
    process : int
        Index of this process (0 on a single process).
    processes : int
        Number of processes of the run.
    """

    output: str
    explained: int
    skipped: int
    errors: int
    seconds: float
    process: int = 0
    processes: int = 1


def row_key(row_id) -> str:
    """The key that identifies a row across runs: its id as JSON (``3`` and ``"3"`` are different ids)."""
    if isinstance(row_id, bool) or not isinstance(row_id, (int, str)):
        raise ValueError(f"a row id must be a string or an integer, got {row_id!r} ({type(row_id).__name__})")
    return json.dumps(row_id)


def check_options(options: Mapping[str, Any], per_token: bool = False) -> dict:
    """The ``explain`` options for every row, checked before any row is explained.

    Raises
    ------
    ValueError
        For an option that comes from the rows (target, ...), an unknown method, or ``per_token``
        with an ``explain`` that has no per-token relevance.
    TypeError
        For an option ``explain`` does not have.
    """
    options = dict(options)
    per_row = sorted(set(options) & set(REQUEST_KEYS))
    if per_row:
        raise ValueError(f"{per_row} come from each row (its 'prompt', 'target', 'contrast', 'continuation' "
                         "fields), not from the options of the run; put them in the rows")
    parameters = inspect.signature(explain_tokens if per_token else explain).parameters
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        function = "explain_tokens() (per-token rows)" if per_token else "explain()"
        raise TypeError(f"{function} has no option(s) {unknown}; its options are "
                        f"{sorted(set(parameters) - {'model', 'tokenizer', 'prompt', 'continuation'})}")
    if options.get("composite") is None and options.get("method", "attnlrp") not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {options.get('method')!r}")
    if per_token:
        options["per_token"] = True
    return options


def explain_rows(
    model, tokenizer, rows: Iterable[Mapping], *, batch_size: int = 8, per_token: bool = False, skip=None,
    **options,
) -> Iterator[tuple[int, dict]]:
    """Explain every row; yields ``(index, output row)`` in the order of the rows.

    Parameters
    ----------
    model, tokenizer
        A causal language model and its tokenizer (see :func:`lxt_explicit.explain.explain`).
    rows : iterable of mapping
        Input rows (see the module's description); a ``datasets.Dataset`` works as it is.
    batch_size : int
        Rows explained together, padded, in one forward and backward pass.
    per_token : bool
        Explain every token of each row's answer with :func:`~lxt_explicit.per_token.explain_tokens`
        (one row of relevance per answer token; see :func:`per_token_output`), one row at a time.
    skip : callable, optional
        ``skip(index, key) -> bool``: rows for which it is true are not explained and not yielded
        (used for resuming and sharding).
    **options
        Options of :func:`~lxt_explicit.explain.explain` for every row (``method``, ``epsilon``,
        ``chat``, ``system``, ``max_new_tokens``, ...).

    Raises
    ------
    ValueError
        For a bad ``batch_size`` or options (``chat=True`` with a tokenizer without a chat
        template), or two rows with the same id.
    """
    options = _check_run(tokenizer, batch_size, per_token, options)
    pending = _pending(rows, skip)
    while batch := list(islice(pending, batch_size)):
        yield from zip((index for index, _ in batch), _explain_batch(model, tokenizer, batch, options))


def _check_run(tokenizer, batch_size, per_token: bool, options: dict) -> dict:
    """The checked options of a run (before any row is read)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size!r}")
    options = check_options(options, per_token)
    if options.get("chat") and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"chat=True needs the tokenizer's chat template, and this {type(tokenizer).__name__} has "
                         "none; leave chat out and write the prompts in the model's format")
    return options


def _pending(rows: Iterable[Mapping], skip) -> Iterator[tuple[int, dict]]:
    """``(index, row with its id)`` of the rows to explain; ids checked to be unique."""
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        row = dict(row) if isinstance(row, Mapping) else {"input": row}
        if row.get("id") is None:  # also a missing value in a table's id column
            row["id"] = index
        key = row_key(row["id"])
        if key in seen:
            raise ValueError(f"rows {seen[key]} and {index} have the same id {row['id']!r}; ids identify the rows "
                             "(to resume a run), so give each row its own id, or none (the index is used)")
        seen[key] = index
        if skip is None or not skip(index, key):
            yield index, row


def _explain_batch(model, tokenizer, batch: list[tuple[int, dict]], options: dict) -> list[dict]:
    """Output rows of one batch: next-token rows explained together (each with its own target), errors per row."""
    if options.get("per_token"):
        return [per_token_output(model, tokenizer, row, options) for _, row in batch]
    outputs: list[dict | None] = [None] * len(batch)
    groups: dict[str | None, list[int]] = {}
    for position, (_, row) in enumerate(batch):
        problem = _row_problem(row)
        if problem:
            outputs[position] = {**row, "explanation": None, "error": f"ValueError: {problem}"}
        else:
            groups.setdefault(row.get("continuation"), []).append(position)
    for members in groups.values():
        rows = [batch[m][1] for m in members]
        results = _explain_group(model, tokenizer, rows, options)
        _to_outputs(model, tokenizer, rows, results)
        for member, row, result in zip(members, rows, results):
            if isinstance(result, Exception):
                outputs[member] = {**row, "explanation": None, "error": _describe(result)}
            else:
                outputs[member] = {**row, "explanation": result, "error": None}
    return outputs


def per_token_output(model, tokenizer, row: dict, options: dict) -> dict:
    """The output row of a per-token run: the relevance of every earlier token for each answer token.

    The answer is the row's ``"continuation"``, else its ``"target"`` (as text), else generated
    greedily (``max_new_tokens``, default 32).  ``"explanation"`` holds ``token_texts``, ``token_ids``,
    ``prompt_length``, ``answer``, ``matrix`` (row ``t``: the relevance of the tokens before answer
    token ``t`` for its logit, :func:`~lxt_explicit.per_token.explain_tokens`), ``target_values`` (each
    row's logit), ``method``, ``epsilon``, ``stop_reason``, and, for the whole answer, the sum of the
    rows as ``relevance`` (the explanation of the sum of the answer's logits, ``target_value``),
    ``conservation`` and ``relevance_shares`` (:mod:`lxt_explicit.sinks`; per row in
    ``relevance_shares_per_token``).
    """
    problem = _row_problem(row)
    answer = row.get("continuation") or row.get("target")
    if not problem and answer is not None and not isinstance(answer, str):
        problem = f"a per-token row's 'target' is the answer's text, got {answer!r}"
    if problem:
        return {**row, "explanation": None, "error": f"ValueError: {problem}"}
    kwargs = {key: value for key, value in options.items() if key != "per_token"}
    if answer is None:
        kwargs.setdefault("max_new_tokens", 32)
    else:
        kwargs.pop("max_new_tokens", None)
    try:
        matrix = explain_tokens(model, tokenizer, row["prompt"], continuation=answer, **kwargs)
    except Exception as error:  # noqa: BLE001 - recorded in the row, the run goes on
        return {**row, "explanation": None, "error": _describe(error)}
    start, special = matrix.prompt_length, special_positions(tokenizer, matrix.token_ids)
    rows = [matrix.relevance[t, : start + t].double() for t in range(len(matrix))]
    total, value = matrix.relevance.double().sum(0), float(matrix.target_values.double().sum())

    explanation = {
        "token_texts": list(matrix.token_texts), "token_ids": list(matrix.token_ids), "prompt_length": start,
        "answer": matrix.answer_text, "matrix": [r.tolist() for r in rows],
        "target_values": matrix.target_values.tolist(), "method": matrix.method, "epsilon": matrix.epsilon,
        "stop_reason": matrix.stop_reason, "target": f"every token of the answer {matrix.answer_text!r} (rows summed)",
        "target_value": value, "relevance": total.tolist(),
        "conservation": float(total.sum()) / value if value else None,
        "relevance_shares": {**json_shares(total, special), "special_positions": special},
        "relevance_shares_per_token": [json_shares(r, [p for p in special if p < len(r)]) for r in rows],
    }
    return {**row, "explanation": explanation, "error": None}


def _row_problem(row: dict) -> str:
    if "input" in row and "prompt" not in row:
        return f"a row must be a mapping with a 'prompt', got {row['input']!r}"
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return f"the row's 'prompt' must be a non-empty string, got {prompt!r}"
    continuation = row.get("continuation")
    if continuation is not None and not isinstance(continuation, str):
        return f"the row's 'continuation' must be a string, got {continuation!r}"
    return ""


def _explain_group(model, tokenizer, rows: list[dict], options: dict) -> list:
    """Explanations of rows with the same continuation (one padded batch), or per row its exception."""
    kwargs = dict(options, continuation=rows[0].get("continuation"))
    for what in ("target", "contrast"):
        values = [row.get(what) for row in rows]
        kwargs[what] = values if any(v is not None for v in values) else None
    try:
        return list(explain(model, tokenizer, [row["prompt"] for row in rows], **kwargs))
    except Exception as error:  # noqa: BLE001 - recorded in the row, the run goes on
        if len(rows) == 1:
            return [error]
    results = []
    for row in rows:  # find the row that failed
        try:
            results.append(explain(model, tokenizer, row["prompt"], **dict(
                kwargs, target=row.get("target"), contrast=row.get("contrast"))))
        except Exception as error:  # noqa: BLE001
            results.append(error)
    return results


def _to_outputs(model, tokenizer, rows: list[dict], results: list) -> None:
    """Replace explanations by their output dicts (with sink shares, and answer ranks for rows with a target)."""
    done = [i for i, r in enumerate(results) if not isinstance(r, Exception)]
    ranked = [i for i in done if rows[i].get("target") is not None and rows[i].get("continuation") is None]
    ranks = {}
    if ranked:
        try:
            ranks = dict(zip(ranked, answer_ranks(model, [results[i] for i in ranked])))
        except Exception as error:  # noqa: BLE001
            for i in ranked:
                results[i] = error
    for i in done:
        if isinstance(results[i], Exception):
            continue
        data = results[i].to_dict()
        data["relevance_shares"] = sink_shares(results[i], tokenizer)
        if i in ranks:
            data["answer_rank"] = ranks[i]
        results[i] = data


def answer_ranks(model, explanations) -> list[int]:
    """Rank of each explanation's target token among the model's next-token logits (1 = the most likely).

    One forward pass without rules over the explained sequences (left-padded, as ``explain`` does).
    """
    sequences = [e.token_ids for e in explanations]
    length = max(len(s) for s in sequences)
    pad = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq):] = torch.tensor(seq)
        mask[row, length - len(seq):] = 1
    device = next(model.parameters()).device
    inputs = {"input_ids": input_ids.to(device), "use_cache": False}
    if len(sequences) > 1:
        inputs["attention_mask"] = mask.to(device)
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    with torch.no_grad():
        logits = needed_logits(model, inputs, 1)[:, -1].float()
    targets = torch.tensor([e.target_ids[0] for e in explanations], device=logits.device)
    chosen = logits.gather(-1, targets[:, None])
    return [int(r) + 1 for r in (logits > chosen).sum(-1).tolist()]


def _describe(error: Exception) -> str:
    message = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {message}"


def to_json_line(row: dict) -> str:
    """One output row as one line of strict JSON (non-finite numbers and other values made JSON-safe)."""
    return json.dumps(_jsonable(row), allow_nan=False, ensure_ascii=False)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return _jsonable(value.tolist())
    return str(value)


def read_rows(path) -> list[dict]:
    """The complete rows of a JSON Lines file (a last line cut off by an interrupted run is left out)."""
    return [json.loads(line) for line in complete_lines(path)]


def explain_dataset(
    model, tokenizer, rows: Iterable[Mapping], output, *, batch_size: int = 8, per_token: bool = False,
    progress: bool = True, total: int | None = None, **options,
) -> RunSummary:
    """Explain every row and write the output rows to ``output`` (JSON Lines), resumably.

    Rows already in ``output`` (by id) are skipped, so re-running the same command after an
    interruption finishes the file without losing or repeating a row: each row is written as one
    line and flushed to disk, and a last line cut off by an interruption is dropped first.

    Under ``accelerate launch`` (or ``torchrun``: ``WORLD_SIZE`` > 1) every process explains every
    ``WORLD_SIZE``-th row into its own shard file next to ``output``; when all are done, the first
    process merges the shards into ``output`` in the order of the rows, and removes them.

    Parameters
    ----------
    model, tokenizer, rows, batch_size, per_token, **options
        As for :func:`explain_rows`.
    output : str or path
        The JSON Lines file (created, or continued).
    progress : bool
        Show a progress bar (rows, rate, time left) on the first process.
    total : int, optional
        Number of rows, for the progress bar (default: ``len(rows)`` where rows have a length).

    Returns
    -------
    RunSummary
    """
    started = time.perf_counter()
    _check_run(tokenizer, batch_size, per_token, options)
    files = RunFiles(output)
    if total is None and hasattr(rows, "__len__"):
        total = len(rows)
    done = files.done_keys()
    share = None if total is None else len(range(files.process, total, files.processes))
    bar = _progress(progress and files.process == 0, share)
    counts = {"explained": 0, "skipped": 0, "errors": 0}

    def skip(index: int, key: str) -> bool:
        if index % files.processes != files.process:
            return True
        if key in done:
            counts["skipped"] += 1
            if bar is not None and bar.total:
                bar.total -= 1  # shown at the next update: a refresh per skipped row floods logs
            return True
        return False

    try:
        with files.writer() as write:
            for index, row in explain_rows(model, tokenizer, rows, batch_size=batch_size, per_token=per_token,
                                           skip=skip, **options):
                write(index, to_json_line(row))
                counts["explained"] += 1
                counts["errors"] += row["error"] is not None
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    files.finish()
    return RunSummary(str(output), seconds=time.perf_counter() - started, process=files.process,
                      processes=files.processes, **counts)


def _progress(enabled: bool, total: int | None):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc="explaining", dynamic_ncols=True)

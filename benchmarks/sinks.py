"""Attention sinks: AttnLRP as published against ``attnlrp(sinks=...)`` (the sink as a gate, or sink rows as constants).

``sinks='bos'`` (the default of ``attnlrp_sinks``) is the gate where the prompt starts with the
model's BOS token (Gemma's tokenizer adds ``<bos>``; SmolLM2's chat template starts with
``<|im_start|>``, its BOS id) and the paper's rules where it starts with a word (SmolLM2 on plain text).

On SmolLM2-135M-Instruct and Gemma-3-270m (base), on five prompt sets (``sink_prompts.py``:
reading comprehension with a distractor, entity tracking, induction/copying, a held-out lookup set
written after the setting was chosen; subject-verb agreement from
:mod:`lxt_explicit.evaluate.agreement`), for the items the model answers correctly:

* plausibility: is the answer word's occurrence in the prompt the most relevant token (top-1), and
  its reciprocal rank; for agreement, the evaluate module's MRR and pointing accuracy of the subject;
* faithfulness: ABPC (``lxt_explicit.evaluate``, tokens removed in ``--steps`` steps, embeddings set
  to zero, every token ranked) with bootstrap intervals and paired differences to AttnLRP; and
  again with the special tokens kept in place (zeroing the BOS token, the attention sink, changes
  every head that parks its attention there, whatever the text says);
* relevance bookkeeping: relevance at the inputs / explained logit, relevance of the first token
  (the sink) / logit, and (``RelevanceTrace``) the relevance absorbed inside the attention rules per
  layer on the first ``--trace-items`` reading items.

Usage::

    python benchmarks/sinks.py                          # both models, ~45 min on one CPU thread
    python benchmarks/sinks.py --models smollm2 --items 4 --output /tmp/sinks   # quick look

Results: ``benchmarks/results/sinks.json`` and ``sinks.md`` (written by ``sinks_report.py``).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import sink_prompts  # noqa: E402
import torch  # noqa: E402

from lxt_explicit import attnlrp, cp_lrp, evaluate  # noqa: E402
from lxt_explicit.diagnostics import RelevanceTrace  # noqa: E402
from lxt_explicit.evaluate import baselines  # noqa: E402
from lxt_explicit.sinks import text_positions  # noqa: E402

SETS = ("reading", "entities", "induction", "lookup", "agreement")
MODELS = ("smollm2", "gemma3")
LABELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270m (base)",
          "smoke": "synthetic Llama 'tiny' (random weights) with SmolLM2's tokenizer"}


def load(name: str):
    if name == "smoke":
        from transformers import AutoTokenizer

        from lxt_explicit.models.smollm2 import smollm2_folder

        tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
        return common.synthetic_llama("tiny", vocab_size=len(tokenizer)).requires_grad_(False), tokenizer
    if name == "smollm2":
        from lxt_explicit.models.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
    else:
        from lxt_explicit.models.gemma3 import load_gemma3

        model, tokenizer = load_gemma3()
    return model.requires_grad_(False), tokenizer


def methods(thresholds) -> dict:
    """name -> ``method(model, input_ids, target)``; ``sinks t`` is ``attnlrp(sinks=t)``."""
    table = {"attnlrp": functools.partial(baselines.lrp, composite=attnlrp())}
    for t in thresholds:
        table[f"sinks {t}"] = functools.partial(baselines.lrp, composite=attnlrp(sinks=t))
    table["cp_lrp"] = functools.partial(baselines.lrp, composite=cp_lrp())
    table["input_x_gradient"] = baselines.input_x_gradient
    return table


def items_of(kind: str, model_name: str, tokenizer, limit: int | None):
    if kind == "reading":
        items = sink_prompts.reading_items("base" if model_name == "gemma3" else "instruct", tokenizer)
    elif kind == "entities":
        items = sink_prompts.entity_items()
    elif kind == "lookup":
        items = sink_prompts.lookup_items()
    else:
        items = sink_prompts.induction_items()
    return items, limit


def encode(item, tokenizer, model_name: str):
    """``(input_ids [1, T], answer positions)``: the tokens that overlap the answer word in its region."""
    chat = model_name == "smollm2" and item.kind == "reading"
    encoded = tokenizer(item.text, add_special_tokens=not chat, return_offsets_mapping=True)
    region = item.text.rfind(item.locate)
    match = re.search(rf"\b{re.escape(item.answer)}\b", item.text[region:region + len(item.locate)])
    if region < 0 or match is None:
        raise ValueError(f"answer {item.answer!r} not found in its region of {item.text!r}")
    start, end = region + match.start(), region + match.end()
    offsets = encoded["offset_mapping"]
    positions = [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]
    stop = region + len(item.locate)
    span = [i for i, (a, b) in enumerate(offsets) if b > a and b > region and a < stop]
    return torch.tensor([encoded["input_ids"]]), positions, span


def correct(tokenizer, token: int, answer: str) -> bool:
    word = tokenizer.decode([token]).strip().lower()
    return len(word) >= min(2, len(answer)) and answer.lower().startswith(word)


def rank_of(relevance: torch.Tensor, positions, span=None) -> int:
    """1-based rank of the best-ranked answer position among the ``span`` positions (all if ``None``)."""
    best = float(relevance[positions].max())
    pool = relevance if span is None else relevance[span]
    return int((pool > best).sum()) + 1


def score_set(model, tokenizer, model_name, kind, table, limit, log) -> dict:
    items, _ = items_of(kind, model_name, tokenizer, limit)
    rows, prompts, text_prompts, relevances = [], [], [], {name: [] for name in table}
    for item in items:
        if limit and len(rows) >= limit:
            break
        ids, positions, span = encode(item, tokenizer, model_name)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        token = int(logits.argmax())
        if model_name == "smoke":  # random weights: explain the answer's token, right or wrong
            token = int(ids[0, positions[0]])
        elif not correct(tokenizer, token, item.answer):
            continue
        row = {"answer": item.answer, "tokens": int(ids.shape[1]), "logit": float(logits[token])}
        for name, method in table.items():
            relevance = method(model, ids, evaluate.Target(token)).double()
            relevances[name].append(relevance.float())
            row[name] = {"rank": rank_of(relevance, positions, span), "rank_all": rank_of(relevance, positions),
                         "sum": float(relevance.sum()) / row["logit"],
                         "first": float(relevance[0]) / row["logit"]}
        rows.append(row)
        prompts.append(evaluate.EvaluationPrompt(ids, evaluate.Target(token), None, item.answer))
        kept = text_positions(tokenizer, ids[0].tolist())  # the special tokens stay in place
        text_prompts.append(evaluate.EvaluationPrompt(ids, evaluate.Target(token), kept, item.answer))
        log(f"{model_name} {kind} {len(rows)}: " + ", ".join(f"{n} {row[n]['rank']}" for n in table))
    return {"tried": len(items) if not limit else None, "rows": rows, "prompts": prompts, "text_prompts": text_prompts,
            "relevance": relevances}


def plausibility(rows, names) -> dict:
    out = {}
    for name in names:
        ranks = np.array([r[name]["rank"] for r in rows], dtype=float)
        ranks_all = np.array([r[name]["rank_all"] for r in rows], dtype=float)
        out[name] = {"top1": int((ranks == 1).sum()), "items": len(ranks), "top1_all": int((ranks_all == 1).sum()),
                     "mrr": float(np.mean(1.0 / ranks)) if len(ranks) else float("nan"),
                     "sum_over_logit": float(np.mean([r[name]["sum"] for r in rows])) if rows else float("nan"),
                     "first_over_logit": float(np.mean([r[name]["first"] for r in rows])) if rows else float("nan")}
    return out


def faithfulness(model, scored, names, args, log, prompts="prompts") -> dict:
    """ABPC of every method; ``prompts='text_prompts'``: with the special tokens kept in place."""
    if not scored[prompts]:
        return {}
    relevance = {name: scored["relevance"][name] for name in names}
    result = evaluate.evaluate_faithfulness(model, scored[prompts], relevance, steps=args.steps, batch=args.batch)
    summary = result.summary(resamples=args.bootstrap)
    return {m: {k: (list(v) if isinstance(v, tuple) else v) for k, v in e.items()} for m, e in summary.items()}


def absorbed_per_layer(model, tokenizer, model_name, thresholds, count) -> dict:
    """Relevance entering and absorbed in each layer's attention rule / logit, and at the inputs."""
    items = sink_prompts.reading_items("base" if model_name == "gemma3" else "instruct", tokenizer)
    out = {}
    for label, composite in [("attnlrp", attnlrp())] + [(f"sinks {t}", attnlrp(sinks=t)) for t in thresholds]:
        per_item = []
        for item in items[:count]:
            ids, _, _ = encode(item, tokenizer, model_name)
            with torch.enable_grad(), composite.context(model), RelevanceTrace(composite) as trace:
                logit = model(input_ids=ids).logits[0, -1].max()
                logit.backward(logit.detach())
                first = float(composite.source_relevance()[evaluate.target.embedding_name(model)][0, 0].sum())
            report = trace.report()
            layers = {}
            for record in report.records:
                if record.label.endswith(":attention"):
                    layer = int(record.label.split(".")[2])
                    layers[layer] = record.absorbed / report.output_total
            per_item.append({"conservation": report.conservation, "first_over_logit": first / report.output_total,
                             "absorbed_in_attention": [layers[k] for k in sorted(layers)]})
        out[label] = {
            "conservation": [p["conservation"] for p in per_item],
            "first_over_logit": [p["first_over_logit"] for p in per_item],
            "absorbed_per_layer": np.mean([p["absorbed_in_attention"] for p in per_item], 0).tolist(),
        }
    return out


def run_model(name, args, log) -> dict:
    model, tokenizer = load(name)
    table = methods(args.thresholds)
    out = {"model": LABELS[name], "sets": {}}
    start = time.perf_counter()
    for kind in args.sets:
        if kind == "agreement":
            items = evaluate.agreement_items(args.agreement_items)
            result = evaluate.evaluate_agreement(model, tokenizer, items, table)
            summary = result.summary(resamples=args.bootstrap)
            out["sets"][kind] = {"items": result.total, "scored": len(result.items), "summary": {
                m: {k: list(v) for k, v in e.items()} for m, e in summary.items()}}
            log(f"{name} agreement: {len(result.items)} scored")
            continue
        scored = score_set(model, tokenizer, name, kind, table, args.items, log)
        entry = {"items": len(scored["rows"]), "plausibility": plausibility(scored["rows"], table),
                 "rows": scored["rows"]}
        entry["abpc"] = faithfulness(model, scored, list(table), args, log)
        entry["abpc_text"] = faithfulness(model, scored, list(table), args, log, prompts="text_prompts")
        out["sets"][kind] = entry
    if args.trace_items:
        out["trace"] = absorbed_per_layer(model, tokenizer, name, args.thresholds, args.trace_items)
    out["seconds"] = time.perf_counter() - start
    return out


def threshold(text: str):
    return text if text in ("bos", "gate", "mix") else float(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + ("smoke",))
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--thresholds", nargs="+", type=threshold, default=["bos", "gate", "mix"],
                        help="settings of attnlrp(sinks=...): 'bos', 'gate', 'mix' or thresholds")
    parser.add_argument("--items", type=int, default=0, help="correctly answered items per set (0: all)")
    parser.add_argument("--agreement-items", type=int, default=4, help="agreement items per template")
    parser.add_argument("--trace-items", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=10000)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="sinks")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny random Llama, 2 items per set")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.items, args.agreement_items, args.trace_items = ["smoke"], 2, 1, 1
        args.steps, args.bootstrap = 2, 50
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {"command": "python benchmarks/sinks.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "environment": common.environment(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in vars(args).items()}, "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name, args, lambda line: print(line, flush=True))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    from sinks_report import write_markdown

    write_markdown(results, args.output / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    main()

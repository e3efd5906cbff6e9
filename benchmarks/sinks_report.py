"""Markdown report of ``sinks.py``'s results (``sinks.json`` -> ``sinks.md``)."""

from __future__ import annotations

from pathlib import Path

LABELS = {"attnlrp": "AttnLRP (paper)", "cp_lrp": "CP-LRP", "input_x_gradient": "Input x Gradient"}


def label(name: str) -> str:
    if name.startswith("sinks "):
        return f"AttnLRP, sinks={name.split()[1]}"
    return LABELS.get(name, name)


def _interval(entry) -> str:
    mean, low, high = entry
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def plausibility_table(model: dict) -> list[str]:
    sets = [k for k, v in model["sets"].items() if "plausibility" in v]
    names = list(model["sets"][sets[0]]["plausibility"]) if sets else []
    lines = ["| method | " + " | ".join(f"{s}: answer first" for s in sets) + " | all sets | "
             + " | ".join(f"{s}: MRR" for s in sets) + " |",
             "|---|" + "---|" * (2 * len(sets) + 1)]
    for name in names:
        cells = [model["sets"][s]["plausibility"][name] for s in sets]
        top, total = sum(c["top1"] for c in cells), sum(c["items"] for c in cells)
        share = f"{top}/{total} ({100 * top / total:.0f} %)" if total else "-"
        lines.append(f"| {label(name)} | " + " | ".join(f"{c['top1']}/{c['items']}" for c in cells)
                     + f" | **{share}** | " + " | ".join(f"{c['mrr']:.2f}" for c in cells) + " |")
    return lines


def abpc_table(model: dict, key: str = "abpc") -> list[str]:
    sets = [k for k, v in model["sets"].items() if v.get(key)]
    if not sets:
        return []
    names = list(model["sets"][sets[0]][key])
    lines = ["| method | " + " | ".join(f"{s}: ABPC" for s in sets) + " | "
             + " | ".join(f"{s}: minus AttnLRP" for s in sets) + " |", "|---|" + "---|" * (2 * len(sets))]
    for name in names:
        cells = [model["sets"][s][key][name] for s in sets]
        diffs = [_interval(c["minus_reference"]) if c.get("minus_reference") else "" for c in cells]
        lines.append(f"| {label(name)} | " + " | ".join(_interval(c["abpc"]) for c in cells) + " | "
                     + " | ".join(diffs) + " |")
    return lines


def agreement_table(model: dict) -> list[str]:
    part = model["sets"].get("agreement")
    if not part:
        return []
    lines = [f"Subject-verb agreement: {part['scored']} of {part['items']} items predicted correctly.", "",
             "| method | MRR of the subject | pointing accuracy |", "|---|---|---|"]
    for name, entry in part["summary"].items():
        lines.append(f"| {label(name)} | {_interval(entry['mrr'])} | {_interval(entry['pointing_accuracy'])} |")
    return lines


def bookkeeping_table(model: dict) -> list[str]:
    sets = [k for k, v in model["sets"].items() if "plausibility" in v]
    names = list(model["sets"][sets[0]]["plausibility"]) if sets else []
    lines = ["| method | " + " | ".join(f"{s}: inputs / logit" for s in sets) + " | "
             + " | ".join(f"{s}: first token / logit" for s in sets) + " |", "|---|" + "---|" * (2 * len(sets))]
    for name in names:
        cells = [model["sets"][s]["plausibility"][name] for s in sets]
        lines.append(f"| {label(name)} | " + " | ".join(f"{c['sum_over_logit']:+.2f}" for c in cells) + " | "
                     + " | ".join(f"{c['first_over_logit']:+.2f}" for c in cells) + " |")
    return lines


def trace_table(model: dict) -> list[str]:
    trace = model.get("trace")
    if not trace:
        return []
    names = list(trace)
    layers = len(trace[names[0]]["absorbed_per_layer"])
    lines = ["| layer | " + " | ".join(label(n) for n in names) + " |", "|---|" + "---|" * len(names)]
    for layer in range(layers):
        lines.append(f"| {layer} | " + " | ".join(f"{trace[n]['absorbed_per_layer'][layer]:+.3f}" for n in names)
                     + " |")
    lines.append("| **sum** | " + " | ".join(f"**{sum(trace[n]['absorbed_per_layer']):+.2f}**" for n in names) + " |")
    lines.append("| inputs / logit | " + " | ".join(", ".join(f"{c:+.2f}" for c in trace[n]["conservation"])
                                                     for n in names) + " |")
    lines.append("| first token / logit | " + " | ".join(", ".join(f"{c:+.2f}" for c in trace[n]["first_over_logit"])
                                                          for n in names) + " |")
    return lines


def report(results: dict) -> str:
    env = results["environment"]
    lines = ["# Attention sinks: AttnLRP as published and with attnlrp(sinks=...)", "",
             f"Command: `{results['command']}`  ",
             *([f"Merged with: `{results['merged_with']}`  "] if results.get("merged_with") else []),
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "  ",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in results["settings"].items()) + ".", "",
             "`AttnLRP, sinks=bos` is `lxt_explicit.attnlrp(sinks='bos')` (= `lxt_explicit.attnlrp_sinks()`): the "
             "gate below where the prompt starts with the model's beginning-of-sequence token (Gemma: `<bos>`; "
             "SmolLM2: `<|im_start|>`, which its chat template puts first, so on SmolLM2 only the reading prompts), "
             "the paper's rules where it starts with a word. "
             "`AttnLRP, sinks=gate` is `lxt_explicit.attnlrp(sinks='gate')`: "
             "every attention row is `o = s_z v_z + (1 - s_z) o'` with `s_z` its weight on the sink (the first token) "
             "and `o'` the attention over the other tokens; the gate `1 - s_z` is a constant, `s_z v_z` a bias, and "
             "the paper's rules apply to `o'`. `AttnLRP, sinks=mix` (`attnlrp(sinks='mix')`): every query row's "
             "relevance is split, the share equal to its attention weight on the sink with constant attention "
             "weights (CP-LRP), the rest with the softmax rule; `sinks=t` (a number): rows whose weight on the sink "
             "exceeds `t` are constant, the others keep the softmax rule. Only items the "
             "model answers correctly are scored. *Answer first*: the answer word's occurrence is the most relevant "
             "token of its region of the prompt (the context sentence, the sentence with the facts, the first "
             "list, the storage list), so the distractor and the other context words compete with it; MRR "
             "likewise. ABPC: tokens "
             "removed in "
             f"{results['settings']['steps']} steps (embeddings set to zero), every token ranked, mean [95 % "
             "bootstrap interval], paired difference to AttnLRP (paper).", ""]
    for name, model in results["models"].items():
        seconds = f"Run time: {model['seconds'] / 60:.1f} min (wall time, summed over the runs, shared 2-core machine)."
        lines += [f"## {model['model']}", "", seconds, "",
                  "### Plausibility", ""] + plausibility_table(model) + [""]
        lines += agreement_table(model) + [""]
        lines += ["### Faithfulness (ABPC of the explained logit)", ""] + abpc_table(model) + [""]
        kept = abpc_table(model, "abpc_text")
        if kept:
            lines += ["ABPC with the special tokens kept (only the text's tokens ranked and removed; the BOS token "
                      "and chat-template markers stay in place):", ""] + kept + [""]
        lines += ["### Where relevance goes (means over the scored items)", ""] + bookkeeping_table(model) + [""]
        if model.get("trace"):
            lines += ["### Relevance absorbed inside the attention rules, per layer (/ logit, first "
                      f"{len(next(iter(model['trace'].values()))['conservation'])} reading items)", ""]
            lines += trace_table(model) + [""]
    return "\n".join(lines)


def write_markdown(results: dict, path: Path) -> None:
    Path(path).write_text(report(results))


def merge(parts: list[dict]) -> dict:
    """One result from runs of single models and sets (run side by side to save wall time)."""
    environment = dict(parts[0]["environment"])
    for key in ("commit", "uncommitted_changes"):  # every run's, in order, once each
        environment[key] = ", ".join(dict.fromkeys(str(p["environment"][key]) for p in parts))
    merged = {"command": " && ".join(p["command"] for p in parts), "environment": environment,
              "settings": {k: v for k, v in parts[0]["settings"].items() if k in ("steps", "batch", "bootstrap")},
              "models": {}}
    for part in parts:
        for name, model in part["models"].items():
            entry = merged["models"].setdefault(name, {"model": model["model"], "sets": {}, "seconds": 0.0})
            entry["sets"].update(model["sets"])
            entry["seconds"] += model["seconds"]
            if model.get("trace") and all(t["conservation"] for t in model["trace"].values()):
                entry["trace"] = model["trace"]
    return merged


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Merge sinks.py results and write the report.")
    parser.add_argument("output", type=Path, help="output path without suffix (writes .json and .md)")
    parser.add_argument("parts", nargs="+", type=Path)
    args = parser.parse_args(argv)
    merged = merge([json.loads(p.read_text()) for p in args.parts])
    merged["merged_with"] = "python benchmarks/sinks_report.py " + " ".join(str(p) for p in [args.output, *args.parts])
    args.output.with_suffix(".json").write_text(json.dumps(merged, indent=1) + "\n")
    write_markdown(merged, args.output.with_suffix(".md"))


if __name__ == "__main__":
    main()

"""Summaries of pipeline runs: selective vs random pre-training vs none, the task's metrics and total epsilon.

    python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...] [--output_dir results]

Prints one table per run and writes it to RUN_DIR/summary.md. The metrics follow the task:
accuracy for classification; perplexity and next-word accuracy for next-word prediction (lm).
Perplexities are shown per word (comparable across the variants, each of which trains its own
tokenizer) and per token (of each variant's own tokenizer).
With --output_dir, also aggregates the runs over seeds (mean and sample standard deviation per
model size, pre-training budget and variant) into table.md, table.csv, runs.csv (one row per
run and variant) and a plot of the main test metric against pre-training words (per-word perplexity for lm).
"""

import argparse
import csv
import json
import math
import os
import statistics

from common.atomic_io import atomic_path
from common.dp import ledger
from common.stage import DataError, run_stage

# (name, directory in the run, its selection or None, its fine-tuning): the DP variants, then those fine-tuned
# without noise (run_pipeline.sh --non_private), shown only where they were run
DP_VARIANTS = (("selective pre-training", "", "selected", "finetune"),
               ("random pre-training", "baselines/random", "selected", "finetune"),
               ("no pre-training", "baselines/scratch", None, "finetune"))
NON_PRIVATE = ", non-private fine-tuning"
VARIANTS = DP_VARIANTS + tuple((name + NON_PRIVATE, sub, selection, "non_private/finetune")
                               for name, sub, selection, _ in DP_VARIANTS)
# task -> (column, label, format) of the fine-tuning metrics shown, the headline first; and the plotted one
TASK_METRICS = {
    "classification": (("val_accuracy", "val accuracy", "{:.4f}"), ("test_accuracy", "test accuracy", "{:.4f}")),
    "lm": (("test_word_perplexity", "test perplexity per word", "{:.1f}"),
           ("test_perplexity", "test perplexity per token", "{:.1f}"),
           ("test_next_token_accuracy", "test next-token accuracy", "{:.4f}"),
           ("test_next_word_accuracy", "test next-word accuracy", "{:.4f}")),
}
PLOTTED = {"classification": "test_accuracy", "lm": "test_word_perplexity"}
# the pre-trained model's perplexity on the target's validation sentences (before any private data is used)
TARGET_METRICS = (("target_word_perplexity", "target perplexity per word"),
                  ("target_perplexity", "target perplexity per token"))
# the non-private diagnostic of each pre-trained model (run_pipeline.sh --linear_probe), and the majority class
PROBE_METRICS = ("probe_last_token", "probe_mean_pooled")
MAJORITY = ("val_majority_share", "test_majority_share")
RUN_FIELDS = ("run_dir", "task", "seed", "model_size", "budget_words", "variant", "finetuning", "pretraining_words",
              "pretraining_tokens", "target_word_perplexity", "target_perplexity",
              *dict.fromkeys(m for metrics in TASK_METRICS.values() for m, _, _ in metrics),
              "total_epsilon", "delta", "dp_releases", "train_examples", *PROBE_METRICS, *MAJORITY)
METRICS = ("target_word_perplexity", "target_perplexity",
           *dict.fromkeys(m for metrics in TASK_METRICS.values() for m, _, _ in metrics),
           "total_epsilon", *PROBE_METRICS, *MAJORITY)


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def finetuning_of(results):
    """What a fine-tuning trained and, for classification, what its head read, and per what unit unless per example:
    e.g. 'all, last token', 'all, per sender'."""
    if results is None:
        return None
    trained = (f"LoRA r{results['lora_r']}" if results.get("lora_r") else
               {"none": "all", "embeddings": "all but embeddings", "body": "head"}[results.get("freeze", "none")])
    if results.get("task", "classification") != "lm":
        trained += f", {'mean-pooled' if results.get('pooling') == 'mean' else 'last token'}"
    unit = results.get("privacy_unit", "example")
    return trained if unit == "example" else f"{trained}, per {unit}"


def summary_rows(run_dir):
    """One row per variant of one run; fields of an unfinished stage are None."""
    selective_report = read_json(os.path.join(run_dir, "selected", "selection_report.json"))
    selective_model = read_json(os.path.join(run_dir, "pretrained", "eval_results.json"))
    rows = []
    for name, sub, selection, finetune in VARIANTS:
        base = os.path.join(run_dir, sub)
        results = read_json(os.path.join(base, finetune, "results.json"))
        if finetune != "finetune" and results is None:
            continue
        pretrained = read_json(os.path.join(base, "pretrained", "eval_results.json")) if selection else None
        report = read_json(os.path.join(base, selection, "selection_report.json")) if selection else None
        probe = read_json(os.path.join(base, "linear_probe", "linear_probe.json")) or {}
        rows.append({
            "run_dir": run_dir,
            "task": results.get("task", "classification") if results else None,
            "seed": results.get("seed") if results else None,
            # the no-pre-training baseline takes the random model's size and tokenizer, the same size as the selective
            "model_size": selective_model["model_size"] if selective_model else None,
            "budget_words": selective_report["budget_words"] if selective_report else None,
            "variant": name,
            "finetuning": finetuning_of(results),
            "pretraining_words": report["selected_words"] if report else 0,
            "pretraining_tokens": (pretrained or {}).get("tokens_seen") if selection else 0,
            "target_word_perplexity": pretrained.get("target_validation_word_perplexity") if pretrained else None,
            "target_perplexity": pretrained.get("target_validation_perplexity") if pretrained else None,
            **{metric: (results or {}).get(metric) for metric in METRICS if metric not in
               ("target_word_perplexity", "target_perplexity", "total_epsilon", *PROBE_METRICS)},
            "probe_last_token": probe.get("val_accuracy_last_token"),
            "probe_mean_pooled": probe.get("val_accuracy_mean_pooled"),
            "total_epsilon": results["composed_epsilon"] if results else None,
            "train_examples": results.get("train_examples") if results else None,
            "delta": results["delta"] if results else None,
            # the DP releases that the variant's fine-tuned model depends on (its own included)
            "dp_releases": " + ".join(results["dp_releases"]) if results else "",
        })
    return rows


def fmt(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def task_of(rows):
    return next((r["task"] for r in rows if r["task"]), "classification")


def run_table(rows):
    """Markdown table of one run's variants."""
    metrics = TASK_METRICS[task_of(rows)]
    lines = ["| variant | pre-training words | " + " | ".join(label for _, label in TARGET_METRICS) + " | "
             + " | ".join(label for _, label, _ in metrics)
             + " | total epsilon | delta | DP releases the model depends on |",
             "|---" * (len(metrics) + len(TARGET_METRICS) + 5) + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['pretraining_words']:,} | "
                     + " | ".join(fmt(r[metric], '{:.1f}') for metric, _ in TARGET_METRICS) + " | "
                     + " | ".join(fmt(r[metric], pattern) for metric, _, pattern in metrics)
                     + f" | {fmt(r['total_epsilon'], '{:.3f}')} | {fmt(r['delta'], '{:.3g}')} | {r['dp_releases']} |")
    return "\n".join(lines) + "\n"


def run_directory_composition(run_dir):
    """Lines giving, per private data set, the composition of every counted DP release in all the ledgers of the
    run directory: what one who sees every variant's release can learn, beside each variant's own total."""
    ledgers = ledger.ledgers_under(run_dir)
    data_sets = sorted({e["private_data"] for directory in ledgers for e in ledger.counted_entries(directory)})
    lines = []
    for data in data_sets:
        epsilons, delta, count = ledger.composition_of_ledgers(ledgers, data)
        units = sorted({ledger.unit_of(e) for directory in ledgers for e in ledger.counted_entries(directory)
                        if e["private_data"] == data})
        line = (f"All {count} DP releases on {data} in this run directory together (every variant's models seen at "
                f"once): epsilon {fmt(epsilons['epsilon'], '{:.3f}')} per {'/'.join(units)} at delta {delta:.3g}")
        if math.isinf(epsilons["epsilon"]):  # fine-tunings without noise (--non_private): the others alone
            noisy, noisy_delta, noisy_count = ledger.composition_of_ledgers(ledgers, data, noisy_only=True)
            if noisy_count:
                line += (f" (the run holds fine-tunings without noise; the {noisy_count} with noise alone: epsilon "
                         f"{noisy['epsilon']:.3f} at delta {noisy_delta:.3g})")
        lines.append(line + ".")
    return "\n".join(lines)


def split_sizes_line(run_dir, rows):
    """The private examples fine-tuned on and the held-out examples evaluated, from the selective run's results."""
    examples = {r["train_examples"] for r in rows if r["train_examples"]}
    if not examples:
        return ""
    results = read_json(os.path.join(run_dir, "finetune", "results.json")) or {}
    held_out = " and ".join(f"{count:,} {split}" for split, count in results.get("eval_examples", {}).items())
    unit = results.get("privacy_unit", "example")
    senders = (f" of {results['train_units']:,} {unit}s, epsilon per {unit} (the held-out splits hold other "
               f"{unit}s)" if "train_units" in results else "")
    return (f"DP fine-tuning on {', '.join(f'{n:,}' for n in sorted(examples))} private training examples (see "
            f"--train_fraction){senders}" + (f", evaluated on {held_out} examples" if held_out else "") + ".")


def classifier_line(run_dir):
    validation = read_json(os.path.join(run_dir, "domain_classifier", "classifier", "validation.json"))
    if not validation:
        return ""
    return (f"DP domain classifier on held-out data: validation AUC {validation['val_auc']:.3f}, accuracy "
            f"{validation['val_accuracy']:.3f} (domain_classifier/classifier/validation.json).")


AUDITED = (("domain classifier", "domain_classifier/classifier"), ("selective fine-tuning", "finetune"),
           ("random-pre-training fine-tuning", "baselines/random/finetune"),
           ("no-pre-training fine-tuning", "baselines/scratch/finetune"))


def audit_lines(run_dir):
    """One line per audited DP stage (run_pipeline.sh --audit): the audit's lower bound beside the accountant's."""
    lines = []
    for name, sub in AUDITED:
        result = read_json(os.path.join(run_dir, sub, "audit.json"))
        if result:
            lines.append(f"Audit of the {name} ({result['canaries']} white-box canaries, {result['correct']} of "
                         f"{result['guesses']} guesses right): epsilon at least {result['epsilon_lower_bound']:.3f} "
                         f"at {result['confidence']:.0%} confidence, against the accountant's "
                         f"{result['accountant_epsilon']:.3f} at delta {result['delta']:.3g} ({sub}/audit.json).")
    return "\n".join(lines)


def source_table(run_dir):
    """Each source's share of the corpus's words and of the selective and random selections, largest ratio first."""
    selective = read_json(os.path.join(run_dir, "selected", "selection_report.json"))
    if not selective or "corpus_source_share" not in selective:
        return ""
    random_share = (read_json(os.path.join(run_dir, "baselines", "random", "selected", "selection_report.json"))
                    or {}).get("selection_source_share", {})
    corpus, chosen = selective["corpus_source_share"], selective["selection_source_share"]
    lines = ["| source | corpus share | selective share | random share | selective / corpus |", "|---|---|---|---|---|"]
    for source in sorted(corpus, key=lambda k: -selective["share_ratio"].get(k, 0)):
        lines.append(f"| {source} | {corpus[source]:.3f} | {chosen.get(source, 0):.3f} | "
                     f"{fmt(random_share.get(source), '{:.3f}')} | {selective['share_ratio'].get(source, 0):.2f} |")
    return "Words selected per source (selected/selection_report.json):\n\n" + "\n".join(lines)


def print_run(run_dir, rows):
    """Print one run's table and write it to RUN_DIR/summary.md."""
    table = run_table(rows)
    parts = [split_sizes_line(run_dir, rows), classifier_line(run_dir), run_directory_composition(run_dir),
             audit_lines(run_dir), source_table(run_dir)]
    note = "".join(f"\n{part}\n" for part in parts if part)
    print(f"\n## {run_dir}\n\n{table}{note}")
    with atomic_path(os.path.join(run_dir, "summary.md")) as tmp, open(tmp, "w") as handle:
        handle.write(f"# {run_dir}\n\n{table}{note}")


def seed_means(rows):
    """One row per seed (a row without a seed stands alone): the mean of each metric over the seed's repeats."""
    by_seed = {}
    for index, r in enumerate(rows):
        by_seed.setdefault(("run", index) if r["seed"] is None else r["seed"], []).append(r)
    means = []
    for repeats in by_seed.values():
        row = {"pretraining_words": statistics.mean(r["pretraining_words"] for r in repeats)}
        for metric in METRICS:
            values = [r[metric] for r in repeats if r[metric] is not None]
            row[metric] = statistics.mean(values) if values else None
        means.append(row)
    return means


def aggregate(rows):
    """Mean and sample std over seeds of the finished rows, per (model size, budget, tokens seen, variant,
    fine-tuning recipe): runs fine-tuned differently are never averaged together.

    The no-pre-training baseline of a learning curve is one experiment per seed (its tokenizer comes from the
    random selection, whatever the length of pre-training), rerun by each length's run: those repeats differ
    only in the fine-tuning's secret sampling, so they are averaged within their seed and the seed counts once.
    """
    groups = {}
    for r in rows:
        if r["total_epsilon"] is None:  # fine-tuning not finished
            continue
        groups.setdefault((r["model_size"], r["budget_words"], r["pretraining_tokens"], r["variant"],
                           r["finetuning"]), []).append(r)
    order = {name: i for i, (name, _, _, _) in enumerate(VARIANTS)}
    table = []
    for (size, budget, tokens, variant, finetuning), members in sorted(groups.items(), key=lambda kv: (
            str(kv[0][0]), kv[0][1] or 0, order[kv[0][3]], kv[0][4], kv[0][2] or 0)):
        if tokens == 0:
            members = seed_means(members)
        entry = {"model_size": size, "budget_words": budget, "pretraining_tokens": tokens, "variant": variant,
                 "finetuning": finetuning, "seeds": len(members),
                 "pretraining_words": statistics.mean(m["pretraining_words"] for m in members)}
        for metric in METRICS:
            values = [m[metric] for m in members if m[metric] is not None]
            entry[f"{metric}_mean"] = statistics.mean(values) if values else None
            # epsilon is infinite without noise: no spread to show
            spread = len(values) > 1 and all(math.isfinite(v) for v in values)
            entry[f"{metric}_std"] = statistics.stdev(values) if spread else None
        table.append(entry)
    return table


def is_learning_curve(table):
    """Whether the table holds pre-trainings of several lengths (tokens seen) at one model size and budget."""
    lengths = {}
    for e in table:
        if e["pretraining_tokens"]:
            lengths.setdefault((e["model_size"], e["budget_words"]), set()).add(e["pretraining_tokens"])
    return any(len(values) > 1 for values in lengths.values())


def mean_std(entry, metric, pattern):
    mean, std = entry[f"{metric}_mean"], entry[f"{metric}_std"]
    if mean is None:
        return "n/a"
    return pattern.format(mean) + ("" if std is None else " ± " + pattern.format(std))


def write_markdown(path, table, task):
    metrics = list(TASK_METRICS[task])
    # columns shown only where some run has them: tokens seen (a learning curve), the probe and the majority class
    curve = is_learning_curve(table)
    metrics += [(metric, label, "{:.4f}") for metric, label in (
        ("probe_last_token", "probe, last token (not private)"),
        ("probe_mean_pooled", "probe, mean-pooled (not private)"),
        ("test_majority_share", "test majority share")) if any(e[f"{metric}_mean"] is not None for e in table)]
    lines = ["| model | budget (words) | " + ("tokens seen | " if curve else "") + "variant | fine-tuned | seeds | "
             + " | ".join(label for _, label in TARGET_METRICS) + " | "
             + " | ".join(label for _, label, _ in metrics) + " | total epsilon |",
             "|---" * (len(metrics) + len(TARGET_METRICS) + 6 + curve) + "|"]
    for e in table:
        lines.append(f"| {e['model_size']} | {fmt(e['budget_words'], '{:,}')} | "
                     + (f"{fmt(e['pretraining_tokens'], '{:,}')} | " if curve else "")
                     + f"{e['variant']} | {e['finetuning']} | {e['seeds']} | "
                     + " | ".join(mean_std(e, metric, '{:.1f}') for metric, _ in TARGET_METRICS) + " | "
                     + " | ".join(mean_std(e, metric, pattern) for metric, _, pattern in metrics)
                     + f" | {mean_std(e, 'total_epsilon', '{:.3f}')} |")
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def write_csv(path, rows, fields):
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def x_positions(lengths):
    """Where each pre-training length goes on a log axis: itself, and 0 (no pre-training) a factor of 4 left of
    the shortest length, or at 1 when nothing was pre-trained."""
    positive = sorted(length for length in lengths if length > 0)
    return {length: length if length > 0 else (positive[0] / 4 if positive else 1.0) for length in lengths}


def short_count(count):
    """A tick label: 0 is no pre-training, then 950, 12k, 1M, 1.5M, 16M."""
    if count == 0:
        return "none"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:g}"


def plot_metric_vs_tokens(path, table, task):
    """The task's main test metric (classification: validation accuracy where the test split has no labels)
    against pre-training words, or against tokens seen for a learning curve; classification also shows the
    majority class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = PLOTTED[task]
    if task == "classification" and all(e["test_accuracy_mean"] is None for e in table):
        metric = "val_accuracy"
    x_field = "pretraining_tokens" if is_learning_curve(table) else "pretraining_words"
    plotted = [e for e in table if e[f"{metric}_mean"] is not None]
    position = x_positions({e[x_field] or 0 for e in plotted})
    figure, axes = plt.subplots(figsize=(9, 4))
    recipes = sorted({e["finetuning"] for e in plotted})
    series = [(size, variant, recipe, marker) for size in sorted({e["model_size"] for e in plotted}, key=str)
              for variant, marker in zip((v[0] for v in VARIANTS), "osxosx") for recipe in recipes]
    series = [s for s in series if any((e["model_size"], e["variant"], e["finetuning"]) == s[:3] for e in plotted)]
    for index, (size, variant, recipe, marker) in enumerate(series):
        points = sorted((e for e in plotted if (e["model_size"], e["variant"], e["finetuning"]) == (size, variant,
                                                                                                    recipe)),
                        key=lambda e: e[x_field] or 0)
        # series at the same length are shifted a few percent apart, centred on it, so that equal values stay visible
        shift = 1.04 ** (index - (len(series) - 1) / 2)
        axes.errorbar([position[p[x_field] or 0] * shift for p in points],
                      [p[f"{metric}_mean"] for p in points], yerr=[p[f"{metric}_std"] or 0.0 for p in points],
                      marker=marker, capsize=3, label=f"{size}: {variant} ({recipe})",
                      linestyle=("--" if NON_PRIVATE in variant else "-") if len(points) > 1 else "none",
                      markerfacecolor="none" if NON_PRIVATE in variant else None)
    majority_key = f"{metric.split('_')[0]}_majority_share_mean"  # val_ or test_, as the metric shown
    majority = [e[majority_key] for e in table if e.get(majority_key) is not None]
    if majority:
        axes.axhline(statistics.mean(majority), color="grey", linestyle=":", label="majority class")
    axes.set_xscale("log")
    if position:
        axes.set_xticks(sorted(position.values()), [short_count(length) for length in sorted(position)])
        axes.set_xlim(min(position.values()) / 1.5, max(position.values()) * 1.5)
    axes.minorticks_off()
    unit = "tokens seen" if x_field == "pretraining_tokens" else "words"
    axes.set_xlabel(f"pre-training {unit} (log scale; series shifted apart)")
    if task == "lm":  # perplexities span orders of magnitude between the variants
        axes.set_yscale("log")
    better = "lower is better; " if task == "lm" else ""
    axes.set_ylabel(metric.replace("_", " ") + f"\n({better}mean ± std over seeds)")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def write_table(output_dir, rows):
    """table.md, table.csv, runs.csv and the plot (accuracy_vs_tokens.png, or word_perplexity_vs_tokens.png)."""
    table, task = aggregate(rows), task_of(rows)
    os.makedirs(output_dir, exist_ok=True)
    write_markdown(os.path.join(output_dir, "table.md"), table, task)
    write_csv(os.path.join(output_dir, "table.csv"), table, list(table[0]) if table else ["model_size"])
    write_csv(os.path.join(output_dir, "runs.csv"), rows, RUN_FIELDS)
    if table:
        name = "accuracy_vs_tokens.png" if task == "classification" else "word_perplexity_vs_tokens.png"
        plot_metric_vs_tokens(os.path.join(output_dir, name), table, task)
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--output_dir", default=None, help="write the table over all runs here")
    args = parser.parse_args(argv)
    rows = []
    for run_dir in args.run_dirs:
        if not os.path.isdir(run_dir):
            raise DataError(f"{run_dir}: not a directory (expected a pipeline run directory)")
        run_rows = summary_rows(run_dir)
        print_run(run_dir, run_rows)
        rows += run_rows
    if args.output_dir:
        write_table(args.output_dir, rows)
        print(f"\n## over seeds -> {args.output_dir}/table.md\n")
        with open(os.path.join(args.output_dir, "table.md")) as handle:
            print(handle.read())


if __name__ == "__main__":
    run_stage(main, timed=False)

"""Summary of one pipeline run: selective vs random pre-training vs none, accuracy and total epsilon.

    python scripts/summarize_runs.py RUN_DIR
"""

import json
import os
import sys

VARIANTS = (("selective pre-training", "", "selected"), ("random pre-training", "baselines/random", "selected"),
            ("no pre-training", "baselines/scratch", None))


def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def summary_rows(run_dir):
    rows = []
    for name, sub, selection in VARIANTS:
        base = os.path.join(run_dir, sub)
        results = read_json(os.path.join(base, "finetune", "results.json"))
        pretrained = read_json(os.path.join(base, "pretrained", "eval_results.json")) if selection else None
        report = read_json(os.path.join(base, selection, "selection_report.json")) if selection else None
        rows.append({
            "variant": name,
            "pretraining_words": report["selected_words"] if report else 0,
            "target_perplexity": pretrained.get("target_validation_perplexity") if pretrained else None,
            "val_accuracy": results["val_accuracy"] if results else None,
            "test_accuracy": results["test_accuracy"] if results else None,
            "total_epsilon": results["composed_epsilon"] if results else None,
            "dp_stages": "+".join(results["ledger_stages"]) if results else "",
        })
    return rows


def fmt(value, pattern):
    return "n/a" if value is None else pattern.format(value)


def main():
    run_dir = sys.argv[1]
    rows = summary_rows(run_dir)
    print(f"\n## {run_dir}\n")
    print("| variant | pre-training words | target perplexity | val accuracy | test accuracy | total epsilon | "
          "DP stages |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['pretraining_words']:,} | {fmt(r['target_perplexity'], '{:.1f}')} | "
              f"{fmt(r['val_accuracy'], '{:.4f}')} | {fmt(r['test_accuracy'], '{:.4f}')} | "
              f"{fmt(r['total_epsilon'], '{:.3f}')} | {r['dp_stages']} |")


if __name__ == "__main__":
    main()

"""Choose a DP fine-tuning recipe on the target's validation split: one stage 6 run per point of a grid.

    python scripts/tune_finetuning.py --model_name_or_path runs/demo/pretrained --output_dir runs/tune_demo \\
        --grid learning_rate=1e-3,3e-3,1e-2 gradient_accumulation_steps=2,8 freeze=none,body \\
        -- --target demo --target_epsilon 4 --target_epsilon_scope run --per_device_train_batch_size 256

Every point of the grid (the product of the `name=value,value` lists; names are
`dp_finetuning/dp_finetune.py` flags without their dashes) is a trial in OUTPUT_DIR/<its settings>,
given the arguments after `--` too. Several `--grid` options search the union of their products
(e.g. learning rates that suit full fine-tuning and others for a frozen body); a flag that one grid
names and another does not keeps dp_finetune.py's default in the other. A finished trial is
skipped, so a killed search resumes; a rerun with another model or other arguments after `--` is
refused. OUTPUT_DIR/tuning.md and tuning.csv list the trials best first by validation accuracy
after the last epoch (test metrics are never shown: the choice must not see them), with the best
epoch's accuracy, the DP steps, the noise multiplier, each trial's composed epsilon and its
seconds.

Privacy. Each trial is a DP release on the private data. Its ledger (the trial directory) first
receives the entries of the DP releases the model depends on (the domain classifier that chose its
data), so each trial's epsilon covers them, as in the pipeline. The choice among trials reads the
validation split without noise: like any hyper-parameter search on private data it is outside the
guarantee (docs/privacy.md), and all trials together spend more than one: tuning.md prints the
composition of every release in OUTPUT_DIR, the trials of earlier grids included.
"""

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time

from common.atomic_io import atomic_path, write_json
from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.stage import DataError, fingerprint, run_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIAL_NAME = "trial.json"
COLUMNS = ("trial", "val_accuracy", "best_val_accuracy", "best_epoch", "val_majority_share", "steps",
           "noise_multiplier", "epsilon", "seconds")


def parse_grid(items):
    """[(flag name, [values])] from `name=v1,v2` items."""
    grid = []
    for item in items:
        name, _, values = item.partition("=")
        if not name or not values or name.startswith("-"):
            raise DataError(f"--grid {item!r}: expected name=value[,value...] with a dp_finetune.py flag name "
                            "without dashes, e.g. learning_rate=1e-3,3e-3")
        grid.append((name, values.split(",")))
    names = [name for name, _ in grid]
    if len(set(names)) != len(names):
        raise DataError(f"--grid names a flag twice: {' '.join(items)}")
    return grid


def trial_name(settings):
    return "_".join(f"{name}-{value}" for name, value in settings)


def seed_ledger(trial_dir, model_dir):
    """Copy into the trial's ledger the entries of the DP releases that the model depends on, and say in the trial
    directory that it depends on them (so they stay counted there)."""
    releases = ledger.read_releases(model_dir)
    ledger.write_releases(trial_dir, releases)
    for release in releases:
        entries = {e["run_id"]: e for e in ledger.load_entries(release["ledger"])}
        if release["run_id"] not in entries:
            raise DataError(f"--model_name_or_path {model_dir}: depends on the DP release {release['stage']} "
                            f"{release['run_id'][:8]}, missing from its ledger {release['ledger']}")
        if all(e["run_id"] != release["run_id"] for e in ledger.load_entries(trial_dir)):
            entry = entries[release["run_id"]]
            ledger.record(trial_dir, entry["stage"], entry["run_id"], Mechanism.from_dict(entry),
                          entry["delta"], entry["private_data"], entry.get("release"),
                          entry.get("dp_randomness", "secret"), entry.get("adjacency"),
                          entry.get("privacy_unit", "example"))


def run_trial(args, settings, passthrough):
    """Run one trial unless its results exist; (trial directory, seconds it took)."""
    trial_dir = os.path.join(args.output_dir, trial_name(settings))
    finetune_dir = os.path.join(trial_dir, "finetune")
    record_path = os.path.join(trial_dir, TRIAL_NAME)
    made_with = {"model": fingerprint(args.model_name_or_path), "arguments": passthrough}
    if os.path.exists(record_path):
        with open(record_path) as handle:
            record = json.load(handle)
        if {key: record.get(key) for key in made_with} != made_with:
            raise DataError(f"{trial_dir} was made with another model or other arguments after '--' "
                            f"({' '.join(record.get('arguments', []))}); use another --output_dir")
        return trial_dir, record["seconds"]
    os.makedirs(trial_dir, exist_ok=True)
    seed_ledger(trial_dir, args.model_name_or_path)
    command = [sys.executable, os.path.join(ROOT, "dp_finetuning", "dp_finetune.py"),
               "--model_name_or_path", args.model_name_or_path, "--output_dir", finetune_dir, "--run_dir", trial_dir,
               "--resume_from_checkpoint", "latest", *passthrough,
               *itertools.chain.from_iterable((f"--{name}", value) for name, value in settings)]
    print(f"=== trial {trial_name(settings)}", flush=True)
    start = time.time()
    completed = subprocess.run(command)
    if completed.returncode != 0:
        # not a DataError: that would remove the whole search directory, finished trials included
        print(f"error: trial {trial_name(settings)} failed (exit code {completed.returncode}, its error above); "
              "fix the grid or the arguments and rerun: finished trials are kept", file=sys.stderr)
        sys.exit(2)
    seconds = time.time() - start
    write_json(record_path, {"settings": dict(settings), **made_with, "seconds": seconds})
    return trial_dir, seconds


def trial_row(trial_dir, seconds):
    with open(os.path.join(trial_dir, "finetune", "results.json")) as handle:
        results = json.load(handle)
    with open(os.path.join(trial_dir, "finetune", "privacy.json")) as handle:
        privacy = json.load(handle)
    per_epoch = results["val_accuracy_per_epoch"]
    best = max(range(len(per_epoch)), key=per_epoch.__getitem__)
    return {"trial": os.path.basename(trial_dir), "val_accuracy": results["val_accuracy"],
            "best_val_accuracy": per_epoch[best], "best_epoch": best + 1,
            "val_majority_share": results.get("val_majority_share"), "steps": privacy["steps"],
            "noise_multiplier": privacy["noise_multiplier"], "epsilon": results["composed_epsilon"],
            "seconds": round(seconds, 1)}


def search_epsilon(output_dir):
    """Epsilon of every trial in `output_dir` together, those of earlier grids included, with the releases they
    share (the classifier) counted once."""
    entries = {}
    for ledger_directory in ledger.ledgers_under(output_dir):
        entries.update({e["run_id"]: e for e in ledger.counted_entries(ledger_directory)})
    delta = ledger.composition_delta(entries.values())
    return compute_epsilons([Mechanism.from_dict(e) for e in entries.values()], delta)["epsilon"], delta, len(entries)


def write_tables(output_dir, rows, epsilon, delta, releases):
    with atomic_path(os.path.join(output_dir, "tuning.csv")) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS).replace("_", " ") + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join("n/a" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float)
                                and c != "seconds" else str(row[c]) for c in COLUMNS) + " |" for row in rows]
    lines.append(f"\n{len(rows)} trials, {sum(r['seconds'] for r in rows) / 60:.1f} minutes; every DP release in "
                 f"this directory together ({releases}: the trials of earlier grids too, the releases they share "
                 f"once): epsilon {epsilon:.3f} at delta {delta:.3g}. "
                 "Validation accuracy after the last epoch orders the rows; the choice reads the validation split "
                 "without noise.")
    with atomic_path(os.path.join(output_dir, "tuning.md")) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a stage 5 output directory")
    parser.add_argument("--output_dir", required=True, help="one directory per trial, and the tables")
    parser.add_argument("--grid", nargs="+", action="append", required=True,
                        help="name=value[,value...] per dp_finetune.py flag; repeat --grid for a union of grids")
    args = parser.parse_args(ours)
    if not os.path.isdir(args.model_name_or_path):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no such directory (expected a stage 5 "
                        "output)")
    grids = [parse_grid(items) for items in args.grid]
    set_here = {"model_name_or_path", "output_dir", "run_dir", "resume_from_checkpoint",
                *(name for grid in grids for name, _ in grid)}
    clashes = sorted(flag for flag in passthrough if flag.startswith("--") and flag[2:].split("=")[0] in set_here)
    if clashes:
        raise DataError(f"{', '.join(clashes)} after '--': set by the search itself (per trial, or by its own flags)")
    points = {}  # a point that two grids share is one trial
    for grid in grids:
        for values in itertools.product(*(v for _, v in grid)):
            settings = list(zip([name for name, _ in grid], values))
            points.setdefault(trial_name(settings), settings)
    trials = [run_trial(args, settings, passthrough) for settings in points.values()]
    rows = sorted((trial_row(trial_dir, seconds) for trial_dir, seconds in trials),
                  key=lambda row: (-row["val_accuracy"], row["trial"]))
    print(write_tables(args.output_dir, rows, *search_epsilon(args.output_dir)))


if __name__ == "__main__":
    run_stage(main)

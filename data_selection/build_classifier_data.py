"""Stage 2: the domain classifier's data, as the reference build_classifier_data_for_sst2.py.

    python data_selection/build_classifier_data.py --sentences_dir runs/demo/sentences --target demo \\
        --output_dir runs/demo/classifier_data --num_negatives 50000

Positives (label 1): the target task's train sentences. Negatives (label 0): --num_negatives random
public sentences, a number fixed by the flag and a choice made from public data alone (a seeded
order of the public corpus), so that adding or removing one private sentence changes the training
set by at most that sentence. Validation: the target's validation and test sentences against
--od_data_size times as many other random public sentences, whatever the training split holds.
Punctuation removed, lowercased; empty and repeated positives dropped (a set of texts: one more copy
of a text changes nothing), repeated public sentences drawn once, a train positive equal to a
validation text dropped (a rule against the held-out text, record by record). At sender level
(--privacy_unit sender) every training positive keeps its sender in a `unit` column (None for the
negatives, each its own unit), repeats are dropped within a sender only, and a target split here is
split by sender, so that adding or removing a sender changes only that sender's records. Writes
filter_train_nonewline.json and filter_val_nonewline.json (JSON Lines, `sentence` and `label`), the
same as an HF DatasetDict (train, validation), and stats.json. This output holds the private
sentences and counts of them: it is private data, never a release.
"""

import argparse
import json
import os

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

from common.atomic_io import atomic_directory, write_json
from common.data import TEXT_COLUMN_HELP, UNIT_COLUMN_HELP, load_target_task, private_data_id
from common.demo_data import DEFAULT_CACHE_DIR
from common.dp.training import PRIVACY_UNITS
from common.splits import (
    add_split_seed_argument,
    add_train_fraction_argument,
    check_fraction,
    seeded_subset,
    stable_sample,
)
from common.stage import DataError, StageOutput, add_redo_argument, run_stage
from common.text import remove_punctuation


def distinct_positives(sentences, removed, split, held_out=frozenset(), units=None):
    """The distinct non-empty texts of `sentences` as written out, less those in `held_out`; counts why in
    `removed` (keys named by `split`). Each text is kept or dropped by itself: a set, less a fixed set. With
    `units` (one per sentence), (unit, text) pairs: a text repeated by two senders stays in both, so that each
    sender's records depend on that sender alone; returns (texts, their units) then."""
    kept, kept_units, seen = [], [], set()
    for position, text in enumerate(map(remove_punctuation, sentences)):
        key = text if units is None else (units[position], text)
        reason = (f"empty_{split}" if not text else f"{split}_in_validation" if text in held_out
                  else f"duplicate_{split}" if key in seen else None)
        if reason:
            removed[reason] = removed.get(reason, 0) + 1
            continue
        seen.add(key)
        kept.append(text)
        if units is not None:
            kept_units.append(units[position])
    return kept if units is None else (kept, kept_units)


def public_negatives(public_sentences, wanted, seed, avoid):
    """{split: texts}: the first `wanted[split]` distinct non-empty public texts in a seeded order of the corpus,
    train first; a validation negative is never in `avoid` (the validation positives). Reads no private training
    text, so the train negatives are the same for every private data set."""
    order = np.random.default_rng(seed).permutation(len(public_sentences))
    negatives, seen, position, chunk = {name: [] for name in wanted}, set(), 0, 50_000
    for name, count in wanted.items():
        while len(negatives[name]) < count and position < len(order):
            for sentence in public_sentences.select(order[position:position + chunk])["text"]:
                position += 1
                text = remove_punctuation(sentence)
                if text and text not in seen and not (name == "validation" and text in avoid):
                    seen.add(text)
                    negatives[name].append(text)
                    if len(negatives[name]) == count:
                        break
        if len(negatives[name]) < count:
            raise DataError(f"--num_negatives and --od_data_size ask for {sum(wanted.values()):,} negative sentences "
                            f"but the public corpus has {len(seen):,} distinct non-empty ones; ask for fewer or add "
                            "public text")
    return negatives


def build(target, public_sentences, num_negatives, validation_ratio, seed):
    """(DatasetDict train/validation with `sentence` and `label`, counts of what was removed and why).

    Validation: the distinct held-out positives (validation and test) against `validation_ratio` times as many
    public negatives; it never depends on the training split, whose positives its metrics are logged beside.
    Train: the distinct train positives not in validation against `num_negatives` public negatives; where the
    target has a `unit` column (sender level), the train split keeps it (None for the negatives)."""
    removed = {}
    held_out = list(target["validation"]["sentence"]) + (list(target["test"]["sentence"]) if "test" in target else [])
    positives = {"validation": distinct_positives(held_out, removed, "held_out")}
    unit_level = "unit" in target["train"].column_names
    train = distinct_positives(target["train"]["sentence"], removed, "positives", frozenset(positives["validation"]),
                               target["train"]["unit"] if unit_level else None)
    positives["train"], units = train if unit_level else (train, None)
    wanted = {"train": num_negatives, "validation": validation_ratio * len(positives["validation"])}
    negatives = public_negatives(public_sentences, wanted, seed, frozenset(positives["validation"]))
    splits = {}
    for name in ("train", "validation"):
        columns = {"sentence": positives[name] + negatives[name],
                   "label": [1] * len(positives[name]) + [0] * len(negatives[name])}
        if name == "train" and unit_level:
            columns["unit"] = [str(unit) for unit in units] + [None] * len(negatives[name])
        splits[name] = Dataset.from_dict(columns).shuffle(seed=seed).flatten_indices()
    return DatasetDict(splits), removed


def write_json_lines(dataset, path):
    dataset.to_json(path, lines=True, force_ascii=False)


def check_exclusion_split(args):
    """Refuse public sentences whose stage 1 removed this target's held-out text under another split: that split's
    held-out text is this one's training text, read by stage 1 without DP."""
    with open(os.path.join(args.sentences_dir, "stats.json")) as handle:
        exclusion = json.load(handle).get("excluded_target")
    split_here = args.target in ("demo", "chat") or os.path.isfile(args.target)  # a target without its own splits
    if not (exclusion and split_here and exclusion["target"] == args.target):
        return
    if exclusion["split_seed"] != args.split_seed:
        raise DataError(f"--split_seed {args.split_seed}: --sentences_dir {args.sentences_dir} excluded the held-out "
                        f"text of --target {args.target} split with --split_seed {exclusion['split_seed']}, which "
                        "holds training text of this split; use the same --split_seed for both stages")
    unit_column = args.unit_column if args.privacy_unit == "sender" else None
    if exclusion.get("unit_column") != unit_column:
        split_by = f"--unit_column {unit_column}" if unit_column else "text"
        stage1 = f"with --target_unit_column {unit_column}" if unit_column else "without --target_unit_column"
        raise DataError(f"--privacy_unit {args.privacy_unit}: --sentences_dir {args.sentences_dir} excluded the "
                        f"held-out text of --target {args.target} split by {exclusion.get('unit_column') or 'text'}, "
                        f"which holds training text of this split by {split_by}; run stage 1 {stage1}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences_dir", required=True, help="stage 1's output")
    parser.add_argument("--target", default="demo", help="'demo', 'chat', 'glue/sst2', or local files")
    parser.add_argument("--text_column", default=None, help=TEXT_COLUMN_HELP)
    parser.add_argument("--num_negatives", type=int, default=100_000,
                        help="public negatives in the training set: a fixed number, never derived from the private "
                             "data (the paper: 5 x 67,349 SST-2 sentences = 336,745)")
    parser.add_argument("--od_data_size", type=int, default=5, help="validation negatives per validation positive")
    parser.add_argument("--privacy_unit", choices=PRIVACY_UNITS, default="example",
                        help="sender: keep each positive's sender for stage 3's sender-level DP (docs/privacy.md)")
    parser.add_argument("--unit_column", default="sender", help=UNIT_COLUMN_HELP)
    parser.add_argument("--output_dir", required=True)
    add_train_fraction_argument(parser)
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="use a seeded random sample of this many target validation (and test) sentences")
    parser.add_argument("--seed", type=int, default=0)
    add_split_seed_argument(parser)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    add_redo_argument(parser)
    args = parser.parse_args(argv)

    output = StageOutput(args, "stats.json")
    if output.complete():
        return
    for flag, value in (("--num_negatives", args.num_negatives), ("--od_data_size", args.od_data_size)):
        if value < 1:
            raise DataError(f"{flag} must be a positive integer, got {value}")
    check_fraction("--train_fraction", args.train_fraction)
    if not os.path.exists(os.path.join(args.sentences_dir, "stats.json")):
        raise DataError(f"--sentences_dir {args.sentences_dir}: not a finished stage 1 output (no stats.json)")
    check_exclusion_split(args)
    public = datasets.load_from_disk(args.sentences_dir)
    target = load_target_task(args.target, args.text_column, None, args.cache_dir, args.split_seed,
                              args.unit_column if args.privacy_unit == "sender" else None)
    if args.train_fraction is not None:
        target["train"] = stable_sample(target["train"], args.train_fraction, args.seed)
    for split in ("validation", "test"):
        if split in target:
            target[split] = seeded_subset(target[split], args.max_eval_samples, args.seed)
    data, removed = build(target, public, args.num_negatives, args.od_data_size, args.seed)

    stats = {name: {"examples": len(split), "positives": sum(split["label"])} for name, split in data.items()}
    with atomic_directory(args.output_dir) as tmp_dir:
        data.save_to_disk(tmp_dir)
        write_json_lines(data["train"], os.path.join(tmp_dir, "filter_train_nonewline.json"))
        write_json_lines(data["validation"], os.path.join(tmp_dir, "filter_val_nonewline.json"))
        output.claim(tmp_dir)
        write_json(os.path.join(tmp_dir, "stats.json"), {
            **stats, "removed": removed, "num_negatives": args.num_negatives, "od_data_size": args.od_data_size,
            "target": args.target, "private_data": private_data_id(args.target), "seed": args.seed,
            "privacy_unit": args.privacy_unit,
            "unit_column": args.unit_column if args.privacy_unit == "sender" else None})
    # counts of the private sentences stay in stats.json (private, like the sentences), out of the log
    print(f"classifier data: the target's train sentences against {args.num_negatives:,} public negatives -> "
          f"{args.output_dir} (counts in stats.json: private)")


if __name__ == "__main__":
    run_stage(main)

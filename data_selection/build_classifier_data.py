"""Stage 2: the domain classifier's data, as the reference build_classifier_data_for_sst2.py.

    python data_selection/build_classifier_data.py --sentences_dir runs/demo/sentences --target demo \\
        --output_dir runs/demo/classifier_data

Positives (label 1): the target task's train sentences. Negatives (label 0): random public
sentences, --od_data_size times as many. Validation: the target's validation and test
sentences against other random public sentences in the same ratio. Punctuation removed,
lowercased; empty and repeated texts dropped, so that no text is in both splits or has both
labels (stats.json counts what was removed and why). Writes filter_train_nonewline.json and filter_val_nonewline.json (JSON Lines,
`sentence` and `label`) and the same as an HF DatasetDict (train, validation).
"""

import argparse
import os
import shutil
import sys

import datasets
import numpy as np
from datasets import Dataset, DatasetDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_selection.sources import (DEFAULT_CACHE_DIR, DataError, add_split_seed_argument,  # noqa: E402
                                    load_target_task, remove_punctuation)
from common.atomic_io import write_json  # noqa: E402
from common.stage import StageOutput, add_redo_argument, run_stage  # noqa: E402

def build(target, public_sentences, ratio, seed):
    """(DatasetDict train/validation with `sentence` and `label`, counts of what was removed and why).

    Texts are compared as written out (punctuation removed, lowercased, single spaces): empty texts
    are dropped, every text is kept once, a validation positive already in train is dropped, and a
    public sentence equal to a kept text is not taken as a negative, so no text is in both splits or
    carries both labels. Negatives are drawn without replacement in a seeded random order.
    """
    removed = dict.fromkeys(("empty_positives", "duplicate_positives", "validation_positives_in_train",
                             "empty_public", "duplicate_public", "public_equal_to_a_positive"), 0)
    seen = set()

    def is_new(text, empty, repeated, earlier=frozenset(), in_earlier=None):
        """Whether `text` is kept (then it is seen); else count why not."""
        reason = empty if not text else in_earlier if text in earlier else repeated if text in seen else None
        if reason:
            removed[reason] += 1
            return False
        seen.add(text)
        return True

    positives = {"train": [text for text in map(remove_punctuation, target["train"]["sentence"])
                           if is_new(text, "empty_positives", "duplicate_positives")]}
    train_positives = frozenset(seen)
    held_out = list(target["validation"]["sentence"]) + (list(target["test"]["sentence"]) if "test" in target else [])
    positives["validation"] = [text for text in map(remove_punctuation, held_out) if is_new(
        text, "empty_positives", "duplicate_positives", train_positives, "validation_positives_in_train")]
    positive_texts = frozenset(seen)
    wanted = {name: ratio * len(texts) for name, texts in positives.items()}
    order = np.random.default_rng(seed).permutation(len(public_sentences))
    negatives, position, chunk = {"train": [], "validation": []}, 0, 50_000
    for name in ("train", "validation"):
        while len(negatives[name]) < wanted[name] and position < len(order):
            for sentence in public_sentences.select(order[position:position + chunk])["text"]:
                position += 1
                text = remove_punctuation(sentence)
                if is_new(text, "empty_public", "duplicate_public", positive_texts, "public_equal_to_a_positive"):
                    negatives[name].append(text)
                    if len(negatives[name]) == wanted[name]:
                        break
        if len(negatives[name]) < wanted[name]:
            found = sum(len(texts) for texts in negatives.values())
            raise DataError(f"--od_data_size {ratio} asks for {sum(wanted.values()):,} negative sentences but the "
                            f"public corpus has {found:,} distinct non-empty ones that are no positive; lower "
                            "--od_data_size or add public text")
    splits = {}
    for name in ("train", "validation"):
        labels = [1] * len(positives[name]) + [0] * len(negatives[name])
        splits[name] = Dataset.from_dict({"sentence": positives[name] + negatives[name],
                                          "label": labels}).shuffle(seed=seed).flatten_indices()
    return DatasetDict(splits), removed


def write_json_lines(dataset, path):
    dataset.to_json(path, lines=True, force_ascii=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences_dir", required=True, help="stage 1's output")
    parser.add_argument("--target", default="demo", help="'demo', 'chat', 'glue/sst2', or local files")
    parser.add_argument("--text_column", default="sentence")
    parser.add_argument("--od_data_size", type=int, default=5, help="negatives per positive")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="use a seeded random sample of this many target train sentences (quick runs)")
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
    if args.od_data_size < 1:
        raise DataError(f"--od_data_size must be a positive integer, got {args.od_data_size}")
    if not os.path.exists(os.path.join(args.sentences_dir, "stats.json")):
        raise DataError(f"--sentences_dir {args.sentences_dir}: not a finished stage 1 output (no stats.json)")
    public = datasets.load_from_disk(args.sentences_dir)
    target = load_target_task(args.target, args.text_column, None, args.cache_dir, args.split_seed)
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                         ("test", args.max_eval_samples)):
        if split in target and limit is not None and limit < len(target[split]):
            target[split] = target[split].shuffle(seed=args.seed).select(range(limit))
    data, removed = build(target, public, args.od_data_size, args.seed)

    tmp_dir = f"{args.output_dir.rstrip('/')}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    data.save_to_disk(tmp_dir)
    write_json_lines(data["train"], os.path.join(tmp_dir, "filter_train_nonewline.json"))
    write_json_lines(data["validation"], os.path.join(tmp_dir, "filter_val_nonewline.json"))
    stats = {name: {"examples": len(split), "positives": sum(split["label"])} for name, split in data.items()}
    output.claim(tmp_dir)
    write_json(os.path.join(tmp_dir, "stats.json"), {**stats, "removed": removed, "od_data_size": args.od_data_size,
                                                     "target": args.target, "seed": args.seed})
    if os.path.exists(args.output_dir):
        shutil.rmtree(args.output_dir)
    os.replace(tmp_dir, args.output_dir)
    print(f"train {stats['train']}, validation {stats['validation']} -> {args.output_dir}; removed: "
          + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in removed.items() if v))


if __name__ == "__main__":
    run_stage(main)

"""Stage 3: train the domain classifier with DP, then score every public sentence.

    python data_selection/train_domain_classifier.py --data_dir runs/demo/classifier_data \\
        --sentences_dir runs/demo/sentences --output_dir runs/demo/domain_classifier \\
        --noise_multiplier 1.4 --max_grad_norm 1 --per_device_train_batch_size 64 \\
        --gradient_accumulation_steps 32 --learning_rate 1e-3

Training uses the shared DP loop (Poisson sampling, exact clipping, noise, an entry in
the run's privacy ledger). The private data are the target sentences (the positives), so
delta defaults to 1 / (10 x positives); at sender level (stage 2 and this stage with
--privacy_unit sender) the senders are the units sampled and clipped, each public negative a unit
of its own, and delta defaults to 1 / (10 x senders). The release, the classifier with its
`privacy.json` and `validation.json` (accuracy and AUC on held-out data after every epoch), goes to
`<output_dir>/classifier`; the private training state (beside the
output, in `<output_dir>.private`, resumed with --resume_from_checkpoint) is deleted once it
is written. Scores (in-domain probability and logit margin) to
`<output_dir>/scores/shard-NNNNN.npz`, one shard at a time, so a killed run resumes at the
next unfinished shard; several processes (`accelerate launch`) share the shards.
"""

import argparse
import contextlib
import json
import math
import os
import time

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from common.atomic_io import atomic_directory, write_json
from common.dp import ledger
from common.dp.training import (
    DPConfig,
    DPTrainer,
    add_dp_arguments,
    discard_training_state,
    sequence_classification_losses,
)
from common.splits import seeded_subset
from common.stage import DataError, StageOutput, add_redo_argument, run_stage
from data_selection.domain_classifier import (
    SCORES_COMPLETE,
    build_classifier,
    load_classifier,
    save_classifier,
    score_sentences,
)

VALIDATION_FILE = "validation.json"  # in the release: validation accuracy and AUC after every epoch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="stage 2's output")
    parser.add_argument("--sentences_dir", required=True, help="stage 1's output: the sentences to score")
    parser.add_argument("--backbone", choices=("hashed", "transformer"), default="hashed")
    parser.add_argument("--model_name_or_path", default="minilm",
                        help="transformer backbone: 'minilm' (offline), 'bert-base-uncased' (the paper) or a path")
    parser.add_argument("--num_buckets", type=int, default=2 ** 16, help="hashed backbone: hash buckets")
    parser.add_argument("--embedding_dim", type=int, default=64, help="hashed backbone: embedding width")
    parser.add_argument("--score_batch_size", type=int, default=512)
    parser.add_argument("--score_shard_size", type=int, default=100_000, help="sentences per scores shard")
    parser.add_argument("--output_dir", required=True,
                        help="classifier/ (the release) and scores/ (every sentence's score) go here")
    add_dp_arguments(parser)
    add_redo_argument(parser)
    return parser.parse_args(argv)


def train(args, accelerator):
    data = datasets.load_from_disk(args.data_dir)
    train_set, validation = data["train"], data["validation"]
    positives, units = sum(train_set["label"]), None
    if "unit" in train_set.column_names:
        # each public negative is a unit of its own; the private units are the senders
        units = [unit if unit is not None else ("public", row) for row, unit in enumerate(train_set["unit"])]
        positives = len({unit for unit in train_set["unit"] if unit is not None})
    torch.manual_seed(args.seed)  # the classifier's initialisation follows --seed, as the help says
    model, encode = build_classifier(args.backbone, args.model_name_or_path, args.num_buckets, args.embedding_dim)

    def collate(examples):
        return {**encode([e["sentence"] for e in examples]), "labels": torch.tensor([e["label"] for e in examples])}

    held_out = seeded_subset(validation, 4000, seed=0)

    def evaluate(trained):
        probability, _ = score_sentences(trained, encode, list(held_out["sentence"]), device=accelerator.device)
        labels = np.array(held_out["label"])
        return {"val_accuracy": float(((probability > 0.5) == labels).mean()),
                "val_auc": _auc(probability, labels)}

    trainer = DPTrainer(model, train_set, collate, sequence_classification_losses, DPConfig.from_args(args),
                        stage="domain_classifier", private_data=_private_data_name(args.data_dir), eval_fn=evaluate,
                        private_units=positives, units=units, unit_column=_stats(args.data_dir).get("unit_column"))
    trainer.train()

    def save(directory):
        save_classifier(trainer.model, directory, args.backbone, args.model_name_or_path)
        per_epoch = [{**{k: v for k, v in r.items() if k != "epsilon"}, "epsilon": r["epsilon"]["epsilon"]}
                     for r in trainer.history]
        write_json(os.path.join(directory, VALIDATION_FILE), {
            "held_out": "the target's validation and test texts (label 1) against public sentences (label 0), at most "
                        f"{len(held_out):,} of them: evaluation only, outside the DP guarantee as every held-out split",
            **{k: v for k, v in per_epoch[-1].items() if k.startswith("val_")}, "per_epoch": per_epoch})
    classifier_dir = os.path.join(args.output_dir, "classifier")
    with atomic_directory(classifier_dir) if accelerator.is_main_process else contextlib.nullcontext() as tmp:
        trainer.release(save, tmp)  # the main process writes it
    trainer.discard_training_state()
    accelerator.wait_for_everyone()


def check_unit(args):
    """Refuse a --privacy_unit other than the one stage 2 built the data for."""
    built_per = "sender" if "unit" in datasets.load_from_disk(args.data_dir)["train"].column_names else "example"
    if args.privacy_unit != built_per:
        raise DataError(f"--privacy_unit {args.privacy_unit}: --data_dir {args.data_dir} was built per {built_per} "
                        "(stage 2's --privacy_unit); use the same unit in both stages")


def _stats(data_dir):
    """Stage 2's stats.json ({} where there is none)."""
    stats_path = os.path.join(data_dir, "stats.json")
    if not os.path.exists(stats_path):
        return {}
    with open(stats_path) as handle:
        return json.load(handle)


def _private_data_name(data_dir):
    stats = _stats(data_dir)
    return stats.get("private_data", stats.get("target", "target"))


def _auc(scores, labels):
    """Area under the ROC curve: the probability that a positive outranks a negative."""
    ranks = np.argsort(np.argsort(scores)) + 1
    positives = labels == 1
    count_pos, count_neg = positives.sum(), (~positives).sum()
    if count_pos == 0 or count_neg == 0:
        return float("nan")
    return float((ranks[positives].sum() - count_pos * (count_pos + 1) / 2) / (count_pos * count_neg))


def score(args, accelerator):
    """Score every sentence shard by shard; skip shards already written."""
    scores_dir = os.path.join(args.output_dir, "scores")
    if os.path.exists(os.path.join(scores_dir, SCORES_COMPLETE)):
        return
    sentences = datasets.load_from_disk(args.sentences_dir)
    model, encode = load_classifier(os.path.join(args.output_dir, "classifier"))
    model.to(accelerator.device)
    os.makedirs(scores_dir, exist_ok=True)
    num_shards = math.ceil(len(sentences) / args.score_shard_size)
    mine = [i for i in range(num_shards) if i % accelerator.num_processes == accelerator.process_index]
    progress = tqdm(total=len(sentences), desc="scoring", unit="sent", disable=not accelerator.is_main_process)
    start, done = time.perf_counter(), 0
    for index in mine:
        path = os.path.join(scores_dir, f"shard-{index:05d}.npz")
        begin, end = index * args.score_shard_size, min(len(sentences), (index + 1) * args.score_shard_size)
        if not os.path.exists(path):
            probability, logit = score_sentences(model, encode, list(sentences.select(range(begin, end))["text"]),
                                                 args.score_batch_size, accelerator.device)
            with open(f"{path}.tmp", "wb") as handle:
                np.savez(handle, probability=probability, logit=logit)
            os.replace(f"{path}.tmp", path)
            done += end - begin
        progress.update((end - begin) * accelerator.num_processes)
        progress.set_postfix(sent_per_s=f"{done / (time.perf_counter() - start):.0f}")
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "classifier", "privacy.json")) as handle:
            ledger.write_releases(scores_dir, [ledger.release_of(json.load(handle))])
        write_json(os.path.join(scores_dir, SCORES_COMPLETE), {"sentences": len(sentences), "shards": num_shards,
                                                                "shard_size": args.score_shard_size})


def main(argv=None):
    args = parse_args(argv)
    for flag, path in (("--data_dir", args.data_dir), ("--sentences_dir", args.sentences_dir)):
        if not os.path.isdir(path):
            raise DataError(f"{flag} {path}: no such directory (run the earlier stages first)")
    check_unit(args)
    output = StageOutput(args, os.path.join("scores", SCORES_COMPLETE))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if output.start(accelerator):
        discard_training_state(args.output_dir, args.keep_training_state)
        return
    if os.path.exists(os.path.join(args.output_dir, "classifier", "classifier.json")):
        print(f"{args.output_dir}/classifier exists; training skipped")
        discard_training_state(args.output_dir, args.keep_training_state)
    else:
        train(args, accelerator)
    score(args, accelerator)


if __name__ == "__main__":
    run_stage(main)

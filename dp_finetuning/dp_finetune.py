"""Stage 6: fine-tune GPT-2 with DP on the private target task: sequence classification, or next-word
prediction (--task lm).

    python dp_finetuning/dp_finetune.py --model_name_or_path runs/demo/pretrained_selected --target demo \\
        --output_dir runs/demo/finetune_selected --noise_multiplier 1.4 --max_grad_norm 1 \\
        --per_device_train_batch_size 32 --gradient_accumulation_steps 64 --learning_rate 1e-3 \\
        --num_train_epochs 30
    python dp_finetuning/dp_finetune.py --task lm --target chat --model_name_or_path runs/chat/pretrained ...

Classification reads the last token (or the mean, --pooling mean) and reports accuracy; next-word
prediction reports perplexity per word and per token and next-token and next-word accuracy, on the
validation split after every epoch and on test at the end. --random_init is the no-pre-training
baseline (the checkpoint's tokenizer and config only); --freeze and --lora_r train a part. A
checkpoint that depends on DP releases on the same private data (a selection by the DP classifier)
is refused unless the run's ledger counts them. The release: the model, `privacy.json`,
`dp_releases.json` and `results.json` (docs/pipeline.md, "Stage 6").
"""

import argparse
import json
import os
import secrets
from dataclasses import asdict

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import Dataset, concatenate_datasets

from common.atomic_io import write_json
from common.data import TEXT_COLUMN_HELP, UNIT_COLUMN_HELP, load_target_task, majority_share, private_data_id
from common.demo_data import DEFAULT_CACHE_DIR
from common.dp import ledger
from common.dp.training import (
    AUDIT_NAME,
    DPConfig,
    DPTrainer,
    add_dp_arguments,
    discard_training_state,
    ledger_dir,
    private_state_dir,
)
from common.language_modelling import MessageCanaries
from common.models import FREEZE_CHOICES, add_pooling_argument, load_finetuning_model
from common.splits import add_split_seed_argument, add_train_fraction_argument, check_fraction, stable_sample
from common.stage import DataError, StageOutput, add_redo_argument, run_stage
from dp_finetuning.tasks import classification_parts, language_modelling_parts

BLACK_BOX_SEED = "black_box_canaries.json"  # in the private training state: the canaries' secret seed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a stage 5 output directory")
    parser.add_argument("--task", choices=("classification", "lm"), default="classification",
                        help="lm: next-word prediction on the target's text (no labels)")
    parser.add_argument("--max_eval_samples", type=int, default=None,
                        help="lm: evaluate on a seeded random sample of this many validation and test messages")
    parser.add_argument("--random_init", action="store_true",
                        help="random weights (no pre-training); the checkpoint's config and tokenizer are kept")
    parser.add_argument("--target", default="demo", help="'demo', 'chat' (--task lm), 'glue/sst2' or local files")
    parser.add_argument("--text_column", default=None, help=TEXT_COLUMN_HELP)
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--unit_column", default="sender", help=UNIT_COLUMN_HELP)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--freeze", choices=FREEZE_CHOICES, default="none",
                        help="embeddings: token and position embeddings frozen (with --task lm, the tied LM head "
                             "too); body: only the final LayerNorm and the classification head trained")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA adapters of this rank instead (0: off)")
    add_pooling_argument(parser)
    add_train_fraction_argument(parser)
    add_split_seed_argument(parser)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--output_dir", required=True, help="the release: model, privacy.json, results.json")
    add_dp_arguments(parser)
    parser.add_argument("--audit_kind", choices=("white-box", "black-box"), default="white-box",
                        help="--audit_canaries of the white-box kind (gradient canaries in the DP loop) or, for --task "
                             "lm, the black-box kind: messages of random words added to the training messages, each "
                             "with probability 1/2, scored by their loss in the released model (docs/privacy.md)")
    add_redo_argument(parser)
    parser.set_defaults(lr_scheduler_type="linear")
    args = parser.parse_args(argv)
    check_fraction("--train_fraction", args.train_fraction)
    if args.task == "lm" and args.pooling != "last":
        raise DataError("--pooling is for --task classification (a language model predicts every next token)")
    if args.audit_kind == "black-box" and args.task != "lm":
        raise DataError("--audit_kind black-box: canary messages are scored by a language model's loss; use --task lm "
                        "(or the white-box kind)")
    return args


def message_canaries(args, tokenizer, private_examples):
    """The black-box canaries of this run, from a secret seed kept in its private training state (a resumed run
    reads it; every process gets the main process's)."""
    if not 2 <= args.audit_canaries <= 2 * private_examples:
        raise DataError(f"--audit_canaries {args.audit_canaries}: between 2 and 2 x training examples = "
                        f"{2 * private_examples:,} (more canaries than messages would outweigh the data)")
    path = os.path.join(private_state_dir(args.output_dir), BLACK_BOX_SEED)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    seed, resumed = None, os.path.exists(path)
    if accelerator.is_main_process:
        if resumed:
            with open(path) as handle:
                stored = json.load(handle)
            if stored.get("canaries") != args.audit_canaries:
                raise DataError(f"--audit_canaries {args.audit_canaries}: the private training state in "
                                f"{os.path.dirname(path)} holds {stored.get('canaries')} black-box canaries; use that "
                                "count to resume, or delete it to start afresh")
            seed = stored["seed"]
        else:
            seed = secrets.randbits(63)
    if accelerator.num_processes > 1:
        seed = broadcast_object_list([seed], from_process=0)[0]
    try:
        canaries = MessageCanaries.draw(args.audit_canaries, seed, tokenizer)
    except ValueError as error:
        raise DataError(f"--audit_kind black-box with --model_name_or_path {args.model_name_or_path}: "
                        f"{error}") from None
    if accelerator.is_main_process and not resumed:
        write_json(path, {"seed": seed, "canaries": args.audit_canaries})
    return canaries


def with_canaries(train_set, units, canaries):
    """The training set with every canary message after the private ones, each flagged `muted` unless its coin put
    it in: a muted canary has no label, so it contributes a zero gradient. All m are there whatever the coins, so n
    and q do not depend on them (each coin adds or zeroes out one record); at sender level each is its own unit."""
    count = len(canaries.messages)
    rows = {"sentence": canaries.messages, "muted": [not inside for inside in canaries.included],
            **({"unit": [None] * count} if units is not None else {})}
    private = train_set.add_column("muted", [False] * len(train_set))
    train_set = concatenate_datasets([private, Dataset.from_dict(rows, features=private.features)])
    return train_set, None if units is None else units + [("canary", i) for i in range(count)]


def muting_excluded_canaries(collate):
    def collate_with_mutes(examples):
        batch = collate(examples)
        batch["labels"][torch.tensor([bool(e["muted"]) for e in examples])] = -100
        return batch
    return collate_with_mutes


def write_black_box_audit(args, trainer, tokenizer, canaries, report):
    """audit.json of the black-box kind beside privacy.json: the bound from the canaries' losses in the released
    model, and their mean exposure; no canary text (the canaries stay secret with the private training state)."""
    found, exposure_in, exposure_out = canaries.result(trainer.model, tokenizer, args.max_length, trainer.delta)
    accountant = report["epsilon"]["epsilon"]
    write_json(os.path.join(args.output_dir, AUDIT_NAME), {
        "kind": "black-box: messages of random words, each trained on with probability 1/2, scored by their loss in "
                "the released model (Steinke et al. 2023; exposure as Carlini et al. 2019)",
        **asdict(found), "accountant_epsilon": accountant,
        "ratio": found.epsilon_lower_bound / accountant if accountant > 0 else None,
        "mean_exposure_included": exposure_in, "mean_exposure_excluded": exposure_out,
        "cost": f"{len(canaries.messages)} canary messages in the training set, about half of them trained on"})


def main(argv=None):
    args = parse_args(argv)
    output = StageOutput(args, "results.json")
    if not os.path.isdir(args.model_name_or_path):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no such directory (expected a stage 5 "
                        "output)")
    if output.complete():
        discard_training_state(args.output_dir, args.keep_training_state)
        return
    model, tokenizer = load_finetuning_model(args.model_name_or_path, args.task, args.pooling, args.random_init,
                                             args.seed, args.freeze, args.lora_r)
    depends_on = ledger.read_releases(args.model_name_or_path)
    try:
        # without noise the epsilon is infinite whatever else the ledger holds: nothing can be left out
        if args.noise_multiplier != 0:
            ledger.check_counted(depends_on, ledger_dir(args), private_data_id(args.target))
    except ValueError as error:
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: {error}") from None
    lm = args.task == "lm"
    unit_column = args.unit_column if args.privacy_unit == "sender" else None
    task = load_target_task(args.target, args.text_column, None if lm else args.label_column, args.cache_dir,
                            args.split_seed, unit_column)
    train_set = task["train"]
    if args.train_fraction is not None:
        train_set = stable_sample(train_set, args.train_fraction, args.seed)
    private_examples, units = len(train_set), list(train_set["unit"]) if unit_column else None
    canaries = None
    if args.audit_kind == "black-box" and args.audit_canaries:
        canaries = message_canaries(args, tokenizer, private_examples)
        train_set, units = with_canaries(train_set, units, canaries)
    if lm:
        collate, losses, evaluate, lengths = language_modelling_parts(tokenizer, args.max_length, train_set, task,
                                                                      args.max_eval_samples, args.seed)
        if canaries is not None:
            collate = muting_excluded_canaries(collate)
    else:
        collate, losses, evaluate, lengths = classification_parts(tokenizer, args.max_length, train_set, task)
    config = DPConfig.from_args(args)
    if canaries is not None:
        config.audit_canaries = 0  # the DP loop's canaries are the white-box kind
    trainer = DPTrainer(model, train_set, collate, losses, config, stage="finetune",
                        private_data=private_data_id(args.target),
                        eval_fn=lambda trained: {f"val_{k}": v for k, v in evaluate(trained, "validation").items()},
                        lengths=lengths, units=units, unit_column=unit_column,
                        private_units=None if canaries is None else (
                            len(set(units[:private_examples])) if units else private_examples))
    if trainer.accelerator.is_main_process:
        output.claim()
    trainer.train()

    def save_model(directory):
        trainer.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    report = trainer.release(save_model)
    if not trainer.accelerator.is_main_process:
        return
    trainer.model.eval()
    if canaries is not None:
        write_black_box_audit(args, trainer, tokenizer, canaries, report)
    test = {f"test_{k}": v for k, v in evaluate(trainer.model, "test").items()} if "test" in task else {}
    composed, delta = ledger.composed_epsilon(trainer.run_dir)
    releases = depends_on + [ledger.release_of(report)]
    ledger.write_releases(args.output_dir, releases)
    metrics = [k for k in trainer.history[-1] if k.startswith("val_")]
    counts = [k for k in metrics if isinstance(trainer.history[-1][k], int)]  # words scored: the same every epoch
    results = {
        "task": args.task, "model_name_or_path": args.model_name_or_path, "random_init": args.random_init,
        "freeze": args.freeze, "lora_r": args.lora_r, "pooling": args.pooling, "target": args.target,
        "train_examples": len(train_set), "privacy_unit": args.privacy_unit,
        **({"train_units": trainer.num_units} if unit_column else {}),
        # the held-out examples evaluated (next-word prediction: at most --max_eval_samples of each split)
        "eval_examples": {split: min(len(task[split]), args.max_eval_samples if lm and args.max_eval_samples else
                                     len(task[split])) for split in ("validation", "test") if split in task},
        # with --deterministic_dp the seed is the DP randomness, so it stays out of the release
        **({} if args.deterministic_dp else {"seed": args.seed}),
        "dp_randomness": report["dp_randomness"],
        **{f"{k}_per_epoch": [r[k] for r in trainer.history] for k in metrics if k not in counts},
        **{k: trainer.history[-1][k] for k in metrics}, **test,
        "epsilon": report["epsilon"]["epsilon"], "epsilons": report["epsilon"], "stage_delta": trainer.delta,
        "composed_epsilon": composed["epsilon"], "composed_epsilons": composed, "delta": delta,
        "ledger_stages": [e["stage"] for e in ledger.load_entries(trainer.run_dir)],
        "dp_releases": [r["stage"] for r in releases],
        **({} if lm else {f"{prefix}_majority_share": majority_share(task[split]["label"])
                          for prefix, split in (("val", "validation"), ("test", "test")) if split in task}),
    }
    write_json(os.path.join(args.output_dir, "results.json"), results)
    trainer.discard_training_state()
    print(", ".join(f"{k} {v:.4f}" for k, v in {**{k: results[k] for k in metrics}, **test}.items()
                    if v is not None and not isinstance(v, int))
          + f", epsilon {results['epsilon']:.3f} per {args.privacy_unit}, composed over the run "
          f"{results['composed_epsilon']:.3f}")


if __name__ == "__main__":
    run_stage(main)

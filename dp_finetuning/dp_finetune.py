"""Stage 6: fine-tune GPT-2 with DP on the private target task: sequence classification, or next-word
prediction (--task lm).

    python dp_finetuning/dp_finetune.py --model_name_or_path runs/demo/pretrained_selected --target demo \\
        --output_dir runs/demo/finetune_selected --noise_multiplier 1.4 --max_grad_norm 1 \\
        --per_device_train_batch_size 32 --gradient_accumulation_steps 64 --learning_rate 1e-3 \\
        --num_train_epochs 30
    python dp_finetuning/dp_finetune.py --task lm --target chat --model_name_or_path runs/chat/pretrained ...

Classification: `GPT2ForSequenceClassification`, validation accuracy after every epoch, test
accuracy at the end. Language modelling: `GPT2LMHeadModel` (the embedding tied to the LM head,
both trained by default), one example per message; validation perplexity and next-token and
next-word accuracy after every epoch, the same on test at the end
(`dp_finetuning/language_modelling.py` defines them).

--model_name_or_path is a stage 5 checkpoint (model and tokenizer); with --random_init the
weights are drawn afresh (the no-pre-training baseline) and only the tokenizer and config are
used. If that directory depends on DP releases on the same private data (a selection by the
DP domain classifier), the run's privacy ledger must hold them, else the run is refused: the
no-pre-training baseline takes the random selection's tokenizer, learnt from public data only.
All parameters are trained by default; --freeze and --lora_r give partial fine-tuning.
--pooling mean gives the classification head the mean of the final hidden states over the
sentence's tokens instead of the last token's (`GPT2MeanPooledClassifier`; the release's
config.json names that class, which a stock `GPT2ForSequenceClassification` would not reproduce).

The release in --output_dir: the model and tokenizer (`save_pretrained`), `privacy.json`,
`dp_releases.json` (this release and those its input depended on) and `results.json`
(validation accuracy after every epoch, test accuracy, this stage's epsilon and the composed
epsilon of every release in the run's privacy ledger). The private training state is deleted
once they are written.
"""

import argparse
import logging
import os

import torch
from safetensors import SafetensorError
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as transformers_logging

from data_selection.sources import (DEFAULT_CACHE_DIR, DataError, add_split_seed_argument,
                                    add_train_fraction_argument, check_fraction, load_target_task, majority_share,
                                    private_data_id, stable_sample, TEXT_COLUMN_HELP)
from dp_finetuning import privacy_ledger
from common.atomic_io import write_json
from common.stage import StageOutput, add_redo_argument, run_stage
from dp_finetuning.dp_training import (DPTrainer, add_dp_arguments, discard_training_state,
                                      ledger_dir, sequence_classification_losses)
from dp_finetuning.language_modelling import (collate_messages, encode_message,
                                              evaluate_language_model, language_modelling_losses)

FREEZE_CHOICES = ("none", "embeddings", "body")
POOLING_CHOICES = ("last", "mean")
OUTPUT_OPTIONS = ("return_dict", "output_attentions", "output_hidden_states", "use_cache")


class GPT2MeanPooledClassifier(GPT2ForSequenceClassification):
    """`GPT2ForSequenceClassification` whose head reads the mean of the final hidden states over each
    sentence's tokens (its attention mask) rather than the last token's: a small model's mean keeps
    sentiment that its last token loses (the recipe search in docs/results.md)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # PEFT passes every argument of the stock forward; only the output options may be set
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in OUTPUT_OPTIONS)
        if unsupported:
            raise ValueError(f"GPT2MeanPooledClassifier takes input_ids and attention_mask only, got {unsupported}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return SequenceClassifierOutput(logits=self.score((hidden * mask).sum(1) / mask.sum(1)))


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
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--freeze", choices=FREEZE_CHOICES, default="none",
                        help="embeddings: token and position embeddings frozen (with --task lm, the tied LM head "
                             "too); body: only the final LayerNorm and the classification head trained")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA adapters of this rank instead (0: off)")
    add_pooling_argument(parser)
    add_train_fraction_argument(parser)
    add_split_seed_argument(parser)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    add_dp_arguments(parser)
    add_redo_argument(parser)
    parser.set_defaults(lr_scheduler_type="linear")
    args = parser.parse_args(argv)
    check_fraction("--train_fraction", args.train_fraction)
    if args.task == "lm" and args.pooling != "last":
        raise DataError("--pooling is for --task classification (a language model predicts every next token)")
    return args


def add_pooling_argument(parser):
    parser.add_argument("--pooling", choices=POOLING_CHOICES, default="last",
                        help="classification: the head reads the last non-padding token (GPT2ForSequenceClassification)"
                             " or the mean over the sentence's tokens (GPT2MeanPooledClassifier)")


def load_model(args):
    """(model, tokenizer) from a stage 5 directory; errors name what is missing."""
    path = args.model_name_or_path
    for required in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, required)):
            raise DataError(f"--model_name_or_path {path}: no {required}; expected a stage 5 output (model and "
                            "tokenizer)")
    if not args.random_init and not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise DataError(f"--model_name_or_path {path}: no model.safetensors (use --random_init for no pre-training)")
    torch.manual_seed(args.seed)
    classifier = GPT2MeanPooledClassifier if args.pooling == "mean" else GPT2ForSequenceClassification
    model_class, extra = (GPT2LMHeadModel, {}) if args.task == "lm" else (classifier, {"num_labels": 2})
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        if args.random_init:
            model = model_class(model_class.config_class.from_pretrained(path, **extra))
        else:
            model, loading = load_pretrained(model_class, path, extra)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise DataError(f"--model_name_or_path {path}: corrupted or not a stage 5 output "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not args.random_init:
        # a new classification head is expected (the pre-trained model had an LM head); anything else is not
        unexpected_missing = [key for key in loading["missing_keys"] if not key.startswith("score.")]
        if unexpected_missing:
            raise DataError(f"--model_name_or_path {path}: weights missing from model.safetensors: "
                            f"{', '.join(sorted(unexpected_missing)[:5])}")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"],
            task_type="CAUSAL_LM" if args.task == "lm" else "SEQ_CLS"))
    elif args.freeze != "none":
        frozen = model.transformer.wte, model.transformer.wpe
        if args.freeze == "body":
            frozen = frozen + (model.transformer.h,)
        for module in frozen:
            module.requires_grad_(False)
    return model, tokenizer


class _WithoutLoadReport(logging.Filter):
    def filter(self, record):
        return "LOAD REPORT" not in record.getMessage()


def load_pretrained(model_class, path, extra):
    """(model, loading info) without transformers' load report, which the caller checks instead."""
    logger, report_filter = transformers_logging.get_logger("transformers.modeling_utils"), _WithoutLoadReport()
    logger.addFilter(report_filter)
    try:
        return model_class.from_pretrained(path, output_loading_info=True, **extra)
    finally:
        logger.removeFilter(report_filter)


@torch.no_grad()
def accuracy(model, tokenizer, split, max_length, batch_size=128):
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(split), batch_size):
        rows = split[start:start + batch_size]
        batch = tokenizer([s.lower() for s in rows["sentence"]], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        predictions = model(**batch).logits.argmax(-1).cpu()
        correct += int((predictions == torch.tensor(rows["label"])).sum())
    return correct / len(split)


def main(argv=None):
    args = parse_args(argv)
    output = StageOutput(args, "results.json")
    if not os.path.isdir(args.model_name_or_path):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no such directory (expected a stage 5 "
                        "output)")
    if output.complete():
        discard_training_state(args.output_dir, args.keep_training_state)
        return
    model, tokenizer = load_model(args)
    depends_on = privacy_ledger.read_releases(args.model_name_or_path)
    try:
        # without noise the epsilon is infinite whatever else the ledger holds: nothing can be left out
        if args.noise_multiplier != 0:
            privacy_ledger.check_counted(depends_on, ledger_dir(args), private_data_id(args.target))
    except ValueError as error:
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: {error}") from None
    lm = args.task == "lm"
    task = load_target_task(args.target, args.text_column, None if lm else args.label_column, args.cache_dir,
                            args.split_seed)
    train_set = task["train"]
    if args.train_fraction is not None:
        train_set = stable_sample(train_set, args.train_fraction, args.seed)
    if lm:
        collate, losses, evaluate, lengths = language_modelling_parts(args, tokenizer, train_set, task)
    else:
        collate, losses, evaluate, lengths = classification_parts(args, tokenizer, train_set, task)
    trainer = DPTrainer(model, train_set, collate, losses, args, stage="finetune",
                        private_data=private_data_id(args.target),
                        eval_fn=lambda trained: {f"val_{k}": v for k, v in evaluate(trained, "validation").items()},
                        lengths=lengths)
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
    test = {f"test_{k}": v for k, v in evaluate(trainer.model, "test").items()} if "test" in task else {}
    composed, delta = privacy_ledger.composed_epsilon(trainer.run_dir)
    releases = depends_on + [privacy_ledger.release_of(report)]
    privacy_ledger.write_releases(args.output_dir, releases)
    metrics = [k for k in trainer.history[-1] if k.startswith("val_")]
    counts = [k for k in metrics if isinstance(trainer.history[-1][k], int)]  # words scored: the same every epoch
    results = {
        "task": args.task, "model_name_or_path": args.model_name_or_path, "random_init": args.random_init,
        "freeze": args.freeze, "lora_r": args.lora_r, "pooling": args.pooling, "target": args.target,
        "train_examples": len(train_set),
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
        "ledger_stages": [e["stage"] for e in privacy_ledger.load_entries(trainer.run_dir)],
        "dp_releases": [r["stage"] for r in releases],
        **({} if lm else {f"{prefix}_majority_share": majority_share(task[split]["label"])
                          for prefix, split in (("val", "validation"), ("test", "test")) if split in task}),
    }
    write_json(os.path.join(args.output_dir, "results.json"), results)
    trainer.discard_training_state()
    print(", ".join(f"{k} {v:.4f}" for k, v in {**{k: results[k] for k in metrics}, **test}.items()
                    if v is not None and not isinstance(v, int))
          + f", epsilon {results['epsilon']:.3f}, composed over the run "
          f"{results['composed_epsilon']:.3f}")


def classification_parts(args, tokenizer, train_set, task):
    """(collate, per-example losses, evaluate(model, split name), lengths) of sequence classification."""
    def collate(examples):
        # lowercased, as the public text the model was pre-trained on
        batch = tokenizer([e["sentence"].lower() for e in examples], padding=True, truncation=True,
                          max_length=args.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor([e["label"] for e in examples])}

    def evaluate(model, split):
        if -1 in set(task[split]["label"]):  # an unlabelled test set (GLUE)
            return {"accuracy": None}
        return {"accuracy": accuracy(model, tokenizer, task[split], args.max_length)}

    lengths = [min(len(ids), args.max_length)
               for ids in tokenizer([s.lower() for s in train_set["sentence"]])["input_ids"]]
    return collate, sequence_classification_losses, evaluate, lengths


def language_modelling_parts(args, tokenizer, train_set, task):
    """(collate, per-example losses, evaluate(model, split name), lengths) of next-word prediction."""
    held_out = {}
    for split in ("validation", "test"):
        if split in task:
            texts = task[split]
            if args.max_eval_samples is not None and args.max_eval_samples < len(texts):
                texts = texts.shuffle(seed=args.seed).select(range(args.max_eval_samples))
            held_out[split] = list(texts["sentence"])

    def collate(examples):
        return collate_messages([encode_message(tokenizer, e["sentence"], args.max_length) for e in examples],
                                tokenizer.pad_token_id)

    def evaluate(model, split):
        return evaluate_language_model(model, tokenizer, held_out[split], args.max_length)

    lengths = [len(encode_message(tokenizer, text, args.max_length)) for text in train_set["sentence"]]
    return collate, language_modelling_losses, evaluate, lengths


if __name__ == "__main__":
    run_stage(main)

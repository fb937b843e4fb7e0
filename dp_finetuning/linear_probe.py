"""A non-private diagnostic of a pre-trained model's features for a classification target: logistic
regression on frozen features, fitted on the target's train split, scored on its validation split.

    python dp_finetuning/linear_probe.py --model_name_or_path runs/demo/pretrained --target demo \\
        --output_dir runs/demo/linear_probe

Two feature sets from the last hidden layer (after the final LayerNorm): the last non-padding
token (what `GPT2ForSequenceClassification` reads) and the mean over the sentence's tokens. Each
is standardised with the train split's mean and standard deviation, then fitted by L-BFGS on the
mean cross-entropy plus `--l2` times the squared weights (the bias is not penalised).
`--random_init` probes the same architecture with fresh weights: the floor that pre-training has
to beat.

NOT PRIVATE: the probe reads the private labels without noise. It says whether features could
carry the task, never what a DP fine-tuning would reach; `linear_probe.json` must stay with the
private data.
"""

import argparse
import os

import torch
from tqdm.auto import tqdm
from transformers import GPT2Model

from common.atomic_io import write_json
from common.data import load_target_task, majority_share
from common.demo_data import DEFAULT_CACHE_DIR
from common.models import add_model_and_target_arguments, load_stage5
from common.splits import add_split_seed_argument, seeded_subset
from common.stage import DataError, StageOutput, add_redo_argument, run_stage


@torch.no_grad()
def sentence_features(model, tokenizer, sentences, max_length, batch_size=128):
    """(last-token features, mean-pooled features), each (len(sentences), hidden)."""
    last, mean = [], []
    for start in tqdm(range(0, len(sentences), batch_size), desc="features", unit="batch", leave=False):
        batch = tokenizer([s.lower() for s in sentences[start:start + batch_size]], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        last_index = batch["attention_mask"].sum(1) - 1
        last.append(hidden[torch.arange(len(hidden)), last_index])
        mean.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(last), torch.cat(mean)


def fit_logistic_regression(features, labels, l2, max_iter=500):
    """(weights, bias) minimising mean binary cross-entropy + l2 * |weights|^2, by L-BFGS."""
    weights = torch.zeros(features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x, y = features.double(), labels.double()
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = regularised_loss(x, y, weights, bias, l2)
        loss.backward()
        return loss
    optimizer.step(closure)
    return weights.detach(), bias.detach()


def regularised_loss(x, y, weights, bias, l2):
    return torch.nn.functional.binary_cross_entropy_with_logits(x @ weights + bias, y) + l2 * weights.square().sum()


def probe(train_features, train_labels, eval_features, eval_labels, l2):
    """Validation accuracy of the logistic regression fitted on the standardised train features."""
    centre, scale = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    weights, bias = fit_logistic_regression((train_features - centre) / scale, train_labels, l2)
    predictions = ((eval_features.double() - centre) / scale) @ weights + bias > 0
    return float((predictions == eval_labels.bool()).double().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_target_arguments(parser, "a stage 5 output directory", max_length=64)
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="fit on a seeded random sample of this many training examples")
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    add_split_seed_argument(parser)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    add_redo_argument(parser)
    args = parser.parse_args(argv)

    output = StageOutput(args, "linear_probe.json")
    if output.complete():
        return
    if not os.path.isdir(args.model_name_or_path):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no such directory (expected a stage 5 "
                        "output)")
    if args.l2 < 0:
        raise DataError(f"--l2 must be non-negative, got {args.l2}")
    torch.manual_seed(args.seed)
    model, tokenizer = load_stage5(args.model_name_or_path, GPT2Model, args.random_init)
    model.eval()
    task = load_target_task(args.target, args.text_column, args.label_column, args.cache_dir, args.split_seed)
    train = seeded_subset(task["train"], args.max_train_samples, args.seed)
    train_labels, eval_labels = torch.tensor(train["label"]), torch.tensor(task["validation"]["label"])
    train_last, train_mean = sentence_features(model, tokenizer, train["sentence"], args.max_length)
    eval_last, eval_mean = sentence_features(model, tokenizer, task["validation"]["sentence"], args.max_length)
    results = {
        "private": False, "model_name_or_path": args.model_name_or_path, "random_init": args.random_init,
        "target": args.target, "train_examples": len(train), "validation_examples": len(eval_labels), "l2": args.l2,
        "val_accuracy_last_token": probe(train_last, train_labels, eval_last, eval_labels, args.l2),
        "val_accuracy_mean_pooled": probe(train_mean, train_labels, eval_mean, eval_labels, args.l2),
        "val_majority_share": majority_share(task["validation"]["label"]),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    output.claim()
    write_json(os.path.join(args.output_dir, "linear_probe.json"), results)
    print(f"linear probe (not private): last token {results['val_accuracy_last_token']:.4f}, mean-pooled "
          f"{results['val_accuracy_mean_pooled']:.4f}, majority {results['val_majority_share']:.4f} "
          f"-> {args.output_dir}")


if __name__ == "__main__":
    run_stage(main)

"""A non-private diagnostic of DP fine-tuning for a classification target: per parameter group, the
signal of one DP step against the noise that step adds.

    python dp_finetuning/gradient_snr.py --model_name_or_path runs/demo/finetune --target demo \\
        --max_length 64 --noise_multiplier 1.38 --logical_batch_size 1024

At the model's weights (a stage 5 output, with a fresh classification head, or a stage 6 release),
the mean over --num_examples training examples of the clipped per-example gradients (clipped as in
training: to --max_grad_norm over all trainable parameters together, by the same engine) is the
expected direction of a DP step. The Gaussian noise added to that mean has a norm of about
noise_multiplier * max_grad_norm * sqrt(d) / logical batch over a group of d parameters. Their
ratio, per group, says which parameters a DP step moves more by signal than by noise: below 1,
one step's update of that group is mostly noise (T steps along a fixed direction gain at most a
factor sqrt(T)). Dropout is off, so the figures are deterministic.

NOT PRIVATE: the gradients read the private labels without noise; what this prints must stay with
the private data.
"""

import argparse
import math
import os
import re

import torch
from tqdm.auto import tqdm

from common.data import load_target_task
from common.demo_data import DEFAULT_CACHE_DIR
from common.dp.per_example_grads import PerExampleGradients
from common.dp.training import sequence_classification_losses
from common.models import FREEZE_CHOICES, add_model_and_target_arguments, add_pooling_argument, load_finetuning_model
from common.splits import add_split_seed_argument, seeded_subset
from common.stage import DataError, run_stage
from dp_finetuning.tasks import classification_parts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_target_arguments(parser, "a stage 5 output or a stage 6 release", max_length=128)
    parser.add_argument("--freeze", choices=FREEZE_CHOICES, default="none", help="as dp_finetune.py's --freeze")
    add_pooling_argument(parser)
    parser.add_argument("--num_examples", type=int, default=1024, help="training examples the mean is taken over")
    parser.add_argument("--noise_multiplier", type=float, required=True, help="the DP run's (its privacy.json)")
    parser.add_argument("--logical_batch_size", type=int, required=True, help="the DP run's logical batch")
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--per_device_batch_size", type=int, default=128, help="examples per backward pass")
    add_split_seed_argument(parser)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--seed", type=int, default=0, help="draws the fresh head (and the --random_init weights)")
    args = parser.parse_args(argv)
    for name in ("num_examples", "logical_batch_size", "per_device_batch_size"):
        if getattr(args, name) < 1:
            raise DataError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not args.noise_multiplier >= 0 or not 0 < args.max_grad_norm < math.inf:
        raise DataError("--noise_multiplier must be >= 0 and --max_grad_norm positive and finite")
    return args


def parameter_group(name):
    """'embeddings', 'block <i>' or 'final LayerNorm and head' for a GPT-2 classifier's parameter."""
    block = re.search(r"\.h\.(\d+)\.", name)
    if block:
        return f"block {block.group(1)}"
    return "embeddings" if re.search(r"\.(wte|wpe)\.", name) else "final LayerNorm and head"


def mean_clipped_gradient(model, examples, collate, max_grad_norm, batch_size):
    """({parameter name: mean clipped per-example gradient}, unclipped per-example norms) over `examples`."""
    engine = PerExampleGradients(model, max_grad_norm)
    model.eval()
    norms = []
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="per-example gradients", unit="batch"):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            norms.append(engine.backward(sequence_classification_losses(model, batch)))
    finally:
        engine.detach()
    means = {name: param.grad.detach() / len(examples)
             for name, param in model.named_parameters() if param.requires_grad}
    return means, torch.cat(norms)


def signal_to_noise(means, noise_multiplier, max_grad_norm, logical_batch_size):
    """Rows (group, parameters, signal norm, noise norm, ratio), in the model's order, then 'all'."""
    groups = {}
    for name, mean in means.items():
        count, square = groups.get(parameter_group(name), (0, 0.0))
        groups[parameter_group(name)] = count + mean.numel(), square + float(mean.double().pow(2).sum())
    groups["all"] = sum(c for c, _ in groups.values()), sum(s for _, s in groups.values())
    rows = []
    for group, (count, square) in groups.items():
        noise = noise_multiplier * max_grad_norm * math.sqrt(count) / logical_batch_size
        rows.append((group, count, math.sqrt(square), noise, math.sqrt(square) / noise if noise else math.inf))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.model_name_or_path):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no such directory")
    model, tokenizer = load_finetuning_model(args.model_name_or_path, "classification", args.pooling, args.random_init,
                                             args.seed, args.freeze)
    task = load_target_task(args.target, args.text_column, args.label_column, args.cache_dir, args.split_seed)
    train_set = seeded_subset(task["train"], args.num_examples, args.seed)
    collate, _, _, _ = classification_parts(tokenizer, args.max_length, train_set, task)
    means, norms = mean_clipped_gradient(model, train_set, collate, args.max_grad_norm, args.per_device_batch_size)
    print(f"NOT PRIVATE. {len(train_set)} examples of {args.target} at {args.model_name_or_path}: per-example gradient "
          f"norm median {norms.median():.3g}, {float((norms > args.max_grad_norm).float().mean()):.0%} clipped at "
          f"{args.max_grad_norm}; noise multiplier {args.noise_multiplier}, logical batch {args.logical_batch_size}")
    print("| parameters | count | signal: norm of the mean clipped gradient | noise norm on the mean "
          "| signal / noise |")
    print("|---|---|---|---|---|")
    for group, count, signal, noise, ratio in signal_to_noise(means, args.noise_multiplier, args.max_grad_norm,
                                                            args.logical_batch_size):
        print(f"| {group} | {count:,} | {signal:.4f} | {noise:.4f} | {ratio:.3g} |")


if __name__ == "__main__":
    run_stage(main)

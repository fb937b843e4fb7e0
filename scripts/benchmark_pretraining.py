"""Stage 5 throughput: training tokens per second of the pre-training script against a bare
forward/backward/optimiser loop on random tokens with the same model and batch, in the same run.

    python scripts/benchmark_pretraining.py --dataset_path runs/demo/selected [--model_size micro] [--steps 60]
"""

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import GPT2LMHeadModel

from pretraining import pretrain_gpt2


def bare_loop(config, batch_size, block_size, steps):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    ids = torch.randint(0, config.vocab_size, (batch_size, block_size))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up, as the script's first logged steps
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (batch_size, block_size))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size * block_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True)
    parser.add_argument("--model_size", default="micro")
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output:
        pretrain_gpt2.main(["--dataset_path", args.dataset_path, "--model_size", args.model_size,
                            "--per_device_train_batch_size", str(args.per_device_train_batch_size),
                            "--block_size", str(args.block_size), "--max_train_steps", str(args.steps),
                            "--logging_steps", str(args.steps // 2), "--output_dir", output])
        with open(os.path.join(output, "metrics.jsonl")) as handle:
            records = [json.loads(line) for line in handle]
        config = GPT2LMHeadModel.from_pretrained(output).config
    script_rate = records[-1]["tokens_per_second"]  # the second half of the run, past the first steps' warm-up
    bare_rate = bare_loop(config, args.per_device_train_batch_size, args.block_size, args.steps // 2)
    print(f"GPT-2 {args.model_size}, batch {args.per_device_train_batch_size} x {args.block_size} tokens, "
          f"{torch.get_num_threads()} threads")
    print("| loop | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| bare forward/backward/AdamW on random tokens | {bare_rate:,.0f} | 1.00x |")
    print(f"| pretrain_gpt2.py (data pipeline, logging) | {script_rate:,.0f} | {script_rate / bare_rate:.2f}x |")


if __name__ == "__main__":
    main()

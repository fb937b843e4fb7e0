"""Stage 5: pre-train a small GPT-2 from scratch on the selected sentences (non-private, public data).

    python pretraining/pretrain_gpt2.py --dataset_path runs/demo/selected --model_size micro \\
        --output_dir runs/demo/pretrained --max_train_steps 600
    accelerate launch --num_processes 8 pretraining/pretrain_gpt2.py --dataset_path data.ds --model_size tiny ...

Sentences are tokenised, concatenated and cut into --block_size blocks (a held-out share of the
sentences is kept apart first). AdamW with the paper's settings (beta2 0.98, eps 1e-6, weight
decay 0.01, 6% linear warm-up then linear decay). Checkpoints `checkpoint-N` (model, tokenizer,
training state) every --checkpointing_steps and at the end, `--resume_from_checkpoint` continues
with the same data order; the final model and tokenizer are saved in --output_dir, with
`metrics.jsonl` (loss, learning rate, tokens per second), `eval_results.json` (perplexity on the
held-out split; on the target task's validation sentences, per token and per word, as stage 6
scores messages: evaluation only) and `loss.png`.
"""

import argparse
import contextlib
import json
import math
import os
import time

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from common.atomic_io import atomic_directory, atomic_path, write_json
from common.data import load_local, load_target_task
from common.demo_data import DEFAULT_CACHE_DIR
from common.dp import ledger
from common.language_modelling import evaluate_language_model
from common.splits import add_split_seed_argument
from common.stage import DataError, StageOutput, add_redo_argument, resolve_checkpoint, run_stage

# name -> (hidden size, layers, heads, feed-forward size). The paper's reference sizes (Yu et al.) use 12 heads;
# nano and micro train in minutes on 2 CPU cores.
MODEL_SIZES = {
    "nano": (64, 2, 4, 256),
    "micro": (128, 2, 4, 512),
    "tiny": (312, 4, 12, 1200),
    "small1": (384, 6, 12, 1200),
    "small2": (576, 6, 12, 2304),
    "medium": (768, 6, 12, 3072),
    "base": (768, 12, 12, 3072),
}
SIZE_KEY = "selective_pretraining_size"
STATE_FILE = "training_state.pt"
EOS = "<|endoftext|>"


def model_config(size, tokenizer, block_size):
    """GPT-2 of a named size; config.json records the size, and EOS doubles as padding for stage 6."""
    hidden, layers, heads, inner = MODEL_SIZES[size]
    eos = tokenizer.eos_token_id
    return GPT2Config(vocab_size=len(tokenizer), n_positions=block_size, n_embd=hidden, n_layer=layers,
                      n_head=heads, n_inner=inner, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                      **{SIZE_KEY: size})


def train_tokenizer(texts, vocab_size):
    """A byte-level BPE trained on the training text, saved with the model (EOS doubles as padding)."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


def load_tokenizer(path):
    """A local tokenizer directory, or a hub name already in the local cache (e.g. gpt2): never downloads."""
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except OSError:
        raise DataError(f"--tokenizer_name_or_path {path}: no tokenizer there or in the local cache; leave the "
                        "flag out to train a byte-level BPE on the text") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pack(sentences, tokenizer, block_size, num_proc=None):
    """Tokenise (EOS after each sentence), concatenate and cut into blocks of block_size tokens."""
    def tokenize(batch):
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        joined = [token for ids in batch["input_ids"] for token in ids]
        usable = len(joined) // block_size * block_size
        return {"input_ids": [joined[i:i + block_size] for i in range(0, usable, block_size)]}
    tokens = sentences.map(tokenize, batched=True, remove_columns=sentences.column_names, num_proc=num_proc)
    return tokens.map(group, batched=True, batch_size=2000, num_proc=num_proc).with_format("torch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True, help="stage 4's output, or any text dataset/file")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--model_size", default="micro", help=", ".join(MODEL_SIZES))
    parser.add_argument("--tokenizer_name_or_path", default=None,
                        help="a local tokenizer (e.g. GPT-2's BPE); default: train a byte-level BPE on the text")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--warmup_ratio", type=float, default=0.06)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--max_train_tokens", type=float, default=None,
                        help="tokens seen, in millions, over all processes (instead of --max_train_steps): the steps "
                             "are this divided by the tokens of one step, rounded up")
    parser.add_argument("--validation_split_percentage", type=float, default=5)
    parser.add_argument("--eval_target", default=None,
                        help="target task whose validation sentences are evaluated (demo, glue/sst2, files)")
    parser.add_argument("--target_text_column", default=None, help="--eval_target's text column (local files); "
                        "default 'text', else 'sentence'")
    parser.add_argument("--target_unit_column", default=None,
                        help="--eval_target of sender-level DP stages: split a target without splits of its own (chat, "
                             "a single file) by this column as they do, so that the validation senders are not "
                             "training senders")
    parser.add_argument("--checkpointing_steps", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N directory, or 'latest'")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    add_split_seed_argument(parser)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    add_redo_argument(parser)
    return parser.parse_args(argv)


def load_sentences(args):
    dataset, _ = load_local(args.dataset_path, args.text_column)
    if args.text_column != "text":
        dataset = dataset.rename_column(args.text_column, "text")
    return dataset.select_columns(["text"])


def build(args, accelerator):
    """(model, tokenizer, train blocks, held-out blocks), resumed from a checkpoint's tokenizer if any."""
    sentences = load_sentences(args)
    split = sentences.train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
    checkpoint = checkpoint_to_resume(args)
    if checkpoint:
        tokenizer = load_tokenizer(checkpoint)
    elif args.tokenizer_name_or_path:
        tokenizer = load_tokenizer(args.tokenizer_name_or_path)
    else:
        with accelerator.main_process_first():
            tokenizer = train_tokenizer(split["train"]["text"], args.vocab_size)
    train_blocks = pack(split["train"], tokenizer, args.block_size)
    held_out = pack(split["test"], tokenizer, args.block_size)
    if len(train_blocks) == 0:
        raise DataError(f"--dataset_path {args.dataset_path}: too little text for one block of "
                        f"{args.block_size} tokens")
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(model_config(args.model_size, tokenizer, args.block_size))
    model.loss_type = "ForCausalLM"  # transformers finds no loss in the class name GPT2LMHeadModel and warns
    return model, tokenizer, train_blocks, held_out


def checkpoint_to_resume(args):
    path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if path is None:
        return None
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise DataError(f"--resume_from_checkpoint {path}: no {STATE_FILE} in it")
    with open(os.path.join(path, "config.json")) as handle:
        size = json.load(handle).get(SIZE_KEY)
    if size != args.model_size:
        raise DataError(f"--resume_from_checkpoint {path}: a {size} model, but --model_size is {args.model_size}")
    return path


def learning_rate_factor(args):
    warmup = max(1, int(args.warmup_ratio * args.max_train_steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.max_train_steps - step) / max(1, args.max_train_steps - warmup))
    return factor


def batches_forever(blocks, batch_size, seed, epoch=0):
    """Shuffled batches, epoch after epoch; the order of epoch e depends only on (seed, e)."""
    while True:
        generator = torch.Generator().manual_seed(seed + epoch)
        yield from DataLoader(blocks, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
        epoch += 1


def pad_rows(rows):
    """A batch of rows of different lengths ({input_ids}), right-padded, with an attention mask."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row["input_ids"])] = torch.as_tensor(row["input_ids"])
        mask[i, :len(row["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def perplexity(model, blocks, batch_size, device):
    """exp(mean next-token loss) over all tokens of `blocks` (dicts with input_ids; rows may differ in length)."""
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(blocks, batch_size=batch_size, collate_fn=pad_rows):
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum",
                                                 ignore_index=-100)
        total, count = total + loss.item(), count + int((targets != -100).sum())
    model.train()
    return math.exp(total / max(count, 1))


def target_texts(args):
    """The target task's validation sentences (evaluation only, never training)."""
    task = load_target_task(args.eval_target, args.target_text_column, label_column=None, cache_dir=args.cache_dir,
                            seed=args.split_seed, unit_column=args.target_unit_column)
    return list(task["validation"]["sentence"])


def save_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, step, directory):
    if not accelerator.is_main_process:
        return
    with atomic_directory(directory) as tmp:
        accelerator.unwrap_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state(),  # dropout masks continue as in an uninterrupted run
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(tmp, STATE_FILE))


def train(args, accelerator):
    model, tokenizer, train_blocks, held_out = build(args, accelerator)
    checkpoint = checkpoint_to_resume(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(args))
    step = 0
    if checkpoint:
        try:
            model.load_state_dict(GPT2LMHeadModel.from_pretrained(checkpoint).state_dict())
            state = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=True)
        except Exception as error:  # whatever torch's unpickler raises on a damaged file
            raise DataError(f"--resume_from_checkpoint {checkpoint}: corrupted or not a checkpoint of this stage "
                            f"({type(error).__name__})") from None
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    model, optimizer = accelerator.prepare(model, optimizer)
    shard = train_blocks.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    micro_batches_per_epoch = len(shard) // args.per_device_train_batch_size
    if micro_batches_per_epoch == 0:
        raise DataError(f"--dataset_path {args.dataset_path}: {len(train_blocks)} blocks of {args.block_size} "
                        f"tokens, fewer than one batch of {args.per_device_train_batch_size} per process")
    consumed = step * args.gradient_accumulation_steps
    batches = batches_forever(shard, args.per_device_train_batch_size, args.seed,
                              epoch=consumed // micro_batches_per_epoch)
    for _ in range(consumed % micro_batches_per_epoch):  # the same data order as an uninterrupted run
        next(batches)

    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        keep_metrics_until(metrics_path, step)
    progress = tqdm(total=args.max_train_steps, initial=step, desc="pre-training", unit="step",
                    disable=not accelerator.is_main_process)
    tokens, start = 0, time.perf_counter()
    model.train()
    while step < args.max_train_steps:
        for micro_step in range(args.gradient_accumulation_steps):
            ids = next(batches)["input_ids"].to(accelerator.device)
            last = micro_step == args.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(model):  # all-reduce once per step
                # blocks are full (no padding); the mask is what the model asks for when EOS is also padding
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
                accelerator.backward(loss / args.gradient_accumulation_steps)
            tokens += ids.numel() * accelerator.num_processes
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)
        if step % args.logging_steps == 0 or step == args.max_train_steps:
            rate = tokens / (time.perf_counter() - start)  # since the last log line
            tokens, start = 0, time.perf_counter()
            record = {"step": step, "loss": loss.item(), "learning_rate": scheduler.get_last_lr()[0],
                      "tokens_per_second": rate}
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_per_s=f"{rate:.0f}")
            if accelerator.is_main_process:
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
        if args.checkpointing_steps and step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            save_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, step,
                            os.path.join(args.output_dir, f"checkpoint-{step}"))
    progress.close()
    save_checkpoint(accelerator, model, tokenizer, optimizer, scheduler, step,
                    os.path.join(args.output_dir, f"checkpoint-{step}"))
    if accelerator.is_main_process:
        finish(args, accelerator.unwrap_model(model), tokenizer, held_out, accelerator.device,
               accelerator.num_processes)
    accelerator.wait_for_everyone()


def finish(args, model, tokenizer, held_out, device, num_processes):
    """Final model + tokenizer in output_dir, perplexities, loss curve."""
    results = {"held_out_perplexity": perplexity(model, held_out, args.per_device_train_batch_size, device)
               if len(held_out) else None}
    if args.eval_target:  # per token of this model's tokenizer, and per word: comparable across tokenizers
        model.eval()
        target = evaluate_language_model(model, tokenizer, target_texts(args), args.block_size,
                                         args.per_device_train_batch_size)
        results.update({f"target_validation_{k}": target[k] for k in ("perplexity", "word_perplexity")})
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    # model and tokenizer depend on the DP releases that chose their data (none for a random selection)
    ledger.write_releases(args.output_dir, ledger.read_releases(args.dataset_path))
    write_json(os.path.join(args.output_dir, "eval_results.json"), {
        **results, "model_size": args.model_size, "steps": args.max_train_steps,
        "tokens_seen": args.max_train_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
        * args.block_size * num_processes})
    plot_loss(os.path.join(args.output_dir, "metrics.jsonl"), os.path.join(args.output_dir, "loss.png"))
    print(" ".join(f"{k}={v:.2f}" for k, v in results.items() if v is not None))


def keep_metrics_until(metrics_path, step):
    """Drop the records after `step` (written by a run killed after its last checkpoint): a resumed run writes
    them again."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as handle:
        records = [line for line in handle if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(metrics_path) as tmp, open(tmp, "w") as handle:
        handle.writelines(records)


def plot_loss(metrics_path, png_path, min_points=5):
    """The loss curve, if there are at least `min_points` records (fewer say nothing a plot should show)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as handle:
        records = [json.loads(line) for line in handle]
    if len(records) < min_points:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["step"] for r in records], [r["loss"] for r in records])
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("pre-training loss")
    figure.tight_layout()
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    if args.model_size not in MODEL_SIZES:
        raise DataError(f"--model_size {args.model_size!r}: unknown; choose one of {', '.join(MODEL_SIZES)}")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    if args.max_train_tokens is not None:
        if args.max_train_tokens <= 0:
            raise DataError(f"--max_train_tokens must be positive, got {args.max_train_tokens}")
        tokens_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps * args.block_size
                           * accelerator.num_processes)
        args.max_train_steps = math.ceil(args.max_train_tokens * 1e6 / tokens_per_step)
    if StageOutput(args, "eval_results.json").start(accelerator):
        return
    datasets.disable_caching()  # the maps' caches would land in --dataset_path, the stage before's output
    train(args, accelerator)


if __name__ == "__main__":
    run_stage(main)

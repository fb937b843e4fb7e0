"""The engine's exactness on a device, in float32 and under bf16 and fp16 autocast: its per-example norms and
clipped sum against brute force (each example's own loss, differentiated alone, on the same device under the same
autocast), for GPT-2 with the tied LM head on padded messages and for sequence classification. One table; exit
status 1 if a figure is above its tolerance. Run by scripts/gpu_check.sh (docs/engine.md, "GPU check").

    python scripts/gpu_check.py --device cuda [--width 768 --layers 12 --vocab_size 50257]
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from common.dp.per_example_grads import PerExampleGradients

# relative error allowed per autocast precision: the engine and the brute force round differently
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def lm_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return token_losses.sum(1) / (labels[:, 1:] != -100).sum(1)


def classification_losses(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def batch_of(args, device):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, args.seq_len + 1, (args.batch_size,), generator=generator)
    mask = (torch.arange(args.seq_len)[None] < lengths[:, None]).long()
    ids = torch.randint(1, args.vocab_size, (args.batch_size, args.seq_len), generator=generator) * mask
    labels = torch.randint(0, 2, (args.batch_size,), generator=generator)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def brute_force(model, losses_of, batch, autocast):
    """(B, P) per-example gradients of the trainable parameters, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        with autocast:
            loss = losses_of(model, {k: v[i:i + 1] for k, v in batch.items()}).sum()
        rows.append(torch.cat([g.float().flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def check(model, losses_of, batch, dtype, device):
    """(relative error of the norms, of the clipped sum) of the engine against brute force."""
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")
    grads = brute_force(model, losses_of, batch, autocast).double()
    norms = grads.norm(dim=1)
    max_grad_norm = norms.median().item()  # some examples clipped, some not
    clipped = ((max_grad_norm / norms).clamp(max=1.0)[:, None] * grads).sum(0)
    engine = PerExampleGradients(model, max_grad_norm)
    with autocast:
        losses = losses_of(model, batch)
    engine_norms = engine.backward(losses).double()
    engine_sum = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.requires_grad])
    engine.detach()
    model.zero_grad(set_to_none=True)
    return (((engine_norms - norms).abs() / norms).max().item(),
            ((engine_sum - clipped).norm() / clipped.norm()).item())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=list(TOLERANCE), default=list(TOLERANCE))
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=max(1024, args.seq_len), n_embd=args.width,
                        n_layer=args.layers, n_head=args.heads, num_labels=2, pad_token_id=0, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    batch = batch_of(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"Engine exactness on {name} (torch {torch.__version__}): GPT-2 width {args.width}, {args.layers} layers, "
          f"vocab {args.vocab_size}, batch {args.batch_size} x up to {args.seq_len} tokens, every parameter trained\n")
    print("| model | autocast | max relative error, norms | relative error, clipped sum | tolerance | |")
    print("|---|---|---|---|---|---|")
    failed = False
    for label, model_class, losses_of in (("LM head, tied", GPT2LMHeadModel, lm_losses),
                                          ("sequence classification", GPT2ForSequenceClassification,
                                           classification_losses)):
        torch.manual_seed(0)
        model = model_class(config).to(device).eval()
        for dtype in args.dtypes:
            norm_error, sum_error = check(model, losses_of, batch, dtype, device)
            ok = max(norm_error, sum_error) <= TOLERANCE[dtype]
            failed |= not ok
            print(f"| {label} | {dtype} | {norm_error:.2e} | {sum_error:.2e} | {TOLERANCE[dtype]:.0e} | "
                  f"{'ok' if ok else 'ABOVE TOLERANCE'} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

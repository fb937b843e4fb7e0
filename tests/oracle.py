"""Brute-force per-example gradients with torch.func: the oracle the engine is tested against."""

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad


def lm_loss_per_example(logits, labels):
    """Mean next-token cross-entropy of each example, ignoring labels of -100."""
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    token_losses = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, reduction="none",
                                   ignore_index=-100)
    counts = (shifted_labels != -100).sum(1).clamp_min(1)
    return token_losses.sum(1) / counts


def classification_loss_per_example(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")


def batch_losses(model, batch, loss_fn):
    """Each example's own loss, shape (B,): what the engine's backward takes."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return loss_fn(model(**inputs).logits, batch["labels"])


def per_example_grads(model, batch, loss_fn):
    """{name: (B, *shape)} per-example gradients of the trainable parameters, in float64, one example at a time."""
    reference = copy.deepcopy(model).double().eval()
    params = {n: p.detach() for n, p in reference.named_parameters() if p.requires_grad}

    def loss_of(params, example):
        inputs = {k: v for k, v in example.items() if k != "labels"}
        logits = functional_call(reference, params, args=(), kwargs=inputs).logits
        return loss_fn(logits, example["labels"]).sum()

    size = batch["labels"].shape[0]
    grads = [grad(loss_of)(params, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(size)]
    return {name: torch.stack([g[name] for g in grads]) for name in params}


def norms_and_clipped_sum(grads, max_grad_norm):
    flat = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    norms = flat.norm(dim=1)
    clip_factors = (max_grad_norm / norms).clamp(max=1.0)
    return norms, {name: torch.einsum("b,b...->...", clip_factors, g) for name, g in grads.items()}

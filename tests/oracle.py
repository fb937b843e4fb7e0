"""Brute-force per-example gradients with torch.func: the oracle the engine is tested against."""

import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad


def lm_loss_per_example(logits, labels):
    """Mean next-token negative log-likelihood of each example over the positions whose label is not -100, summed
    position by position from log-probabilities (written independently of the cross-entropy the code uses)."""
    log_probs = logits.log_softmax(-1)
    losses = []
    for example in range(labels.shape[0]):
        terms = [-log_probs[example, t - 1, labels[example, t]] for t in range(1, labels.shape[1])
                 if labels[example, t] != -100]
        losses.append(torch.stack(terms).mean() if terms else log_probs.new_zeros(()))
    return torch.stack(losses)


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


def assert_engine_matches_brute_force(model, losses, grads, rtol=1e-4):
    """The engine's per-example norms and clipped sum on `model` against the brute-force per-example gradients
    `grads` ({name: (B, *shape)}), at the median norm as the clip (some examples clipped, some not); `losses(model)`
    gives the per-example losses of the batch `grads` was computed on."""
    from common.dp.per_example_grads import PerExampleGradients
    reference_norms, _ = norms_and_clipped_sum(grads, 1.0)
    max_grad_norm = reference_norms.median().item()
    _, reference_sum = norms_and_clipped_sum(grads, max_grad_norm)
    engine = PerExampleGradients(model, max_grad_norm)
    norms = engine.backward(losses(model))
    torch.testing.assert_close(norms.double(), reference_norms, rtol=1e-4, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad.double(), reference_sum[name], rtol=rtol, atol=1e-6, msg=name)
    engine.detach()

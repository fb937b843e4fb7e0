"""Unit-level clipping (a sender's examples clipped together) against brute force: per-example gradients from
torch.func, summed within each unit, clipped jointly over all trainable parameters."""

import pytest
import torch

from common.dp.per_example_grads import PerExampleGradients
from data_selection.domain_classifier import build_classifier
from tests.oracle import batch_losses, classification_loss_per_example, lm_loss_per_example, per_example_grads
from tests.test_per_example_grads import gpt2_cls, gpt2_lm, lora, padded_batch


def hashed_classifier_batch():
    torch.manual_seed(0)
    model, encode = build_classifier("hashed", num_buckets=97, embedding_dim=8)
    sentences = ["the film was fine", "a long walk home", "rain again today", "what a great plot", "no", "so it goes"]
    return model.eval(), {**encode(sentences), "labels": torch.tensor([1, 0, 1, 1, 0, 0])}


def gpt2_lm_batch():
    return gpt2_lm(), padded_batch([12, 7, 3, 10, 5, 9], lm=True)


def lora_gpt2_batch():
    return lora(gpt2_cls(), ["c_attn", "c_fc"], fan_in_fan_out=True), padded_batch([12, 7, 3, 10, 5, 9])


CASES = {
    "gpt2_lm_tied_padded": (gpt2_lm_batch, lm_loss_per_example),
    "lora_gpt2": (lora_gpt2_batch, classification_loss_per_example),
    "hashed_domain_classifier": (hashed_classifier_batch, classification_loss_per_example),
}


def unit_clipped_sum(grads, units, max_grad_norm):
    """The oracle: (norm of each unit's summed gradient, in label order; sum over units of the clipped sums)."""
    labels = sorted(set(units.tolist()))
    unit_grads = {name: torch.stack([g[units == label].sum(0) for label in labels]) for name, g in grads.items()}
    norms = torch.cat([g.flatten(1) for g in unit_grads.values()], dim=1).norm(dim=1)
    factors = (max_grad_norm / norms).clamp(max=1.0)
    return norms, {name: torch.einsum("u,u...->...", factors, g) for name, g in unit_grads.items()}


@pytest.mark.parametrize("case", CASES)
# units of sizes 3, 2, 1, in the batch's order or interleaved
@pytest.mark.parametrize("units", [[0, 0, 0, 1, 1, 2], [5, 2, 5, 9, 2, 5]])
def test_unit_clipped_sum_matches_brute_force(case, units):
    make, loss_fn = CASES[case]
    model, batch = make()
    units = torch.tensor(units)
    grads = per_example_grads(model, batch, loss_fn)
    reference_norms, _ = unit_clipped_sum(grads, units, 1.0)
    max_grad_norm = reference_norms.median().item()  # some units clipped, some not
    _, reference_sum = unit_clipped_sum(grads, units, max_grad_norm)

    engine = PerExampleGradients(model, max_grad_norm)
    norms = engine.backward(batch_losses(model, batch, loss_fn), units=units)

    torch.testing.assert_close(norms.double(), reference_norms, rtol=1e-5, atol=1e-7)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad.double(), reference_sum[name], rtol=1e-4, atol=1e-6, msg=name)


def test_units_of_one_example_are_the_per_example_result():
    model, batch = gpt2_lm_batch()
    engine = PerExampleGradients(model, 0.5)
    distinct_labels = torch.arange(6) * 7
    per_example = engine.backward(batch_losses(model, batch, lm_loss_per_example), units=distinct_labels)
    by_unit = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    reference = engine.backward(batch_losses(model, batch, lm_loss_per_example))
    torch.testing.assert_close(per_example, reference, rtol=0, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(by_unit[name], param.grad, rtol=0, atol=0, msg=name)


def test_the_units_need_one_label_per_example():
    model, batch = gpt2_lm_batch()
    engine = PerExampleGradients(model, 1.0)
    with pytest.raises(ValueError, match="one label per example"):
        engine.backward(batch_losses(model, batch, lm_loss_per_example), units=torch.zeros(4, dtype=torch.long))

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from common.dp.per_example_grads import NonFiniteGradientError, PerExampleGradients, UnsupportedParameterError
from common.dp.per_example_grads import engine as engine_module
from common.dp.per_example_grads import factors as engine_factors
from tests.oracle import (
    batch_losses,
    classification_loss_per_example,
    lm_loss_per_example,
    norms_and_clipped_sum,
    per_example_grads,
)

VOCAB, PAD = 61, 0


def gpt2_config(**overrides):
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=24, n_layer=2, n_head=2, pad_token_id=PAD,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)


def bert_model():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=40, max_position_embeddings=32, pad_token_id=PAD,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def padded_batch(lengths, seq_len=12, seed=0, lm=False):
    """Right-padded token ids with an attention mask; LM labels are -100 at padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), seq_len), generator=generator)
    mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask + PAD * (1 - mask)
    if lm:
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, 2, (len(lengths),), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora(model, targets, fan_in_fan_out=False):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                        task_type="SEQ_CLS", init_lora_weights=False)
    return get_peft_model(model, config).eval()


def gpt2_lm():
    torch.manual_seed(0)
    return GPT2LMHeadModel(gpt2_config()).eval()


def gpt2_cls():
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(gpt2_config(num_labels=2)).eval()


CASES = {
    "gpt2_lm_tied_padded": (gpt2_lm, lm_loss_per_example, True),
    "gpt2_cls_right_padding": (gpt2_cls, classification_loss_per_example, False),
    "bert_cls": (bert_model, classification_loss_per_example, False),
    "lora_gpt2": (lambda: lora(gpt2_cls(), ["c_attn", "c_fc"], fan_in_fan_out=True),
                  classification_loss_per_example, False),
    "lora_bert": (lambda: lora(bert_model(), ["query", "value"]), classification_loss_per_example, False),
}


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_norms_and_clipped_sum_match_brute_force(case):
    make_model, loss_fn, lm = CASES[case]
    model = make_model()
    batch = padded_batch([12, 7, 3, 10, 5], lm=lm)
    reference_grads = per_example_grads(model, batch, loss_fn)
    reference_norms, _ = norms_and_clipped_sum(reference_grads, 1.0)
    max_grad_norm = reference_norms.median().item()  # some examples clipped, some not
    _, reference_sum = norms_and_clipped_sum(reference_grads, max_grad_norm)

    engine = PerExampleGradients(model, max_grad_norm)
    norms = engine.backward(batch_losses(model, batch, loss_fn))

    assert relative_error(norms, reference_norms) <= 1e-5
    for n, ref in zip(norms, reference_norms):
        assert abs(n.item() - ref.item()) <= 1e-5 * ref.item()
    params = dict(model.named_parameters())
    clipped = torch.cat([params[name].grad.flatten() for name in reference_sum])
    reference = torch.cat([g.flatten() for g in reference_sum.values()])
    assert relative_error(clipped, reference) <= 1e-5
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    if case.startswith("lora"):
        assert frozen, "LoRA leaves the base model frozen"


@pytest.mark.parametrize("seq_len", [12, 32])  # ghost norms at 12; norms from materialised slices at 32
@pytest.mark.parametrize("keep", [False, True])  # nothing kept materialised, or every linear layer's gradient
def test_every_cost_plan_is_exact(seq_len, keep, monkeypatch):
    monkeypatch.setattr(engine_factors, "MATERIALISE_CHUNK_ELEMENTS", 500)  # several slices per layer
    if keep:  # free memory passes: keeping always saves time
        monkeypatch.setattr(engine_factors, "FLOPS_PER_ELEMENT_PASS", 0)
    kept = []

    def plan_and_count(factors, budget_bytes):
        linear = [(uses, i) for uses in factors.values() for i, f in enumerate(uses) if type(f) is engine_factors.Outer]
        engine_factors.plan_linear_factors(factors, budget_bytes)
        kept.extend(type(uses[i]) is engine_factors.Dense for uses, i in linear)

    monkeypatch.setattr(engine_module, "plan_linear_factors", plan_and_count)
    model = gpt2_lm()
    batch = padded_batch([seq_len, 7, 3, seq_len - 2], seq_len=seq_len, lm=True)
    reference_grads = per_example_grads(model, batch, lm_loss_per_example)
    reference_norms, reference_sum = norms_and_clipped_sum(reference_grads, 0.3)
    engine = PerExampleGradients(model, 0.3, materialise_budget=1e9 if keep else 0.0)
    norms = engine.backward(batch_losses(model, batch, lm_loss_per_example))
    # without a budget, only the gradients no larger than their Gram matrices are kept
    assert kept and all(kept) == keep
    assert relative_error(norms, reference_norms) <= 1e-5
    params = dict(model.named_parameters())
    clipped = torch.cat([params[name].grad.flatten() for name in reference_sum])
    assert relative_error(clipped, torch.cat([g.flatten() for g in reference_sum.values()])) <= 1e-5


def test_plan_counts_memory_passes_and_caps_kept_bytes():
    """At T = 64 a 256 x 1024 gradient is cheaper through its Gram matrices and a GEMM than materialised; at T = 256
    a 256 x 1024 one is kept, unless the batch's gradients exceed MAX_KEPT_BYTES, whatever the budget."""
    def planned(batch, seq_len, left_width, right_width):
        factor = engine_factors.Outer(torch.zeros(batch, seq_len, left_width), torch.zeros(batch, seq_len, right_width))
        factors = {torch.zeros(1): [factor]}
        engine_factors.plan_linear_factors(factors, budget_bytes=1e12)
        return type(next(iter(factors.values()))[0]).__name__, factor.norm_by_materialising

    assert planned(32, 64, 256, 1024) == ("Outer", False)
    fitting = engine_factors.MAX_KEPT_BYTES // (4 * 256 * 1024)
    assert planned(fitting, 256, 256, 1024) == ("Dense", True)
    assert planned(fitting + 1, 256, 256, 1024) == ("Outer", True)


def test_norm_of_a_large_kept_gradient_is_summed_exactly():
    """A 768 x 3072 gradient at T = 256 is kept materialised; its norm summed in float32 came out 4e-5 too small
    (one example could move the clipped sum by C (1 + 4e-5)). Against the float64 gradient, B = 1."""
    torch.manual_seed(0)
    model = nn.Linear(768, 3072, bias=False)
    x, target = torch.randn(1, 256, 768), torch.randn(1, 256, 3072)
    exact = torch.einsum("btk,btr->kr", target.double(), x.double()).norm()
    engine = PerExampleGradients(model, max_grad_norm=0.5 * exact.item())
    norm = engine.backward((model(x) * target).sum((1, 2)))[0]
    assert abs(norm.item() / exact.item() - 1) < 1e-6
    assert model.weight.grad.double().norm().item() <= 0.5 * exact.item() * (1 + 1e-6)


@pytest.mark.parametrize("scale", [4.16e9, 1e20])
def test_large_cross_term_is_exact_or_refused(scale):
    """A parameter used twice, with a negative cross term 2 <G_a, G_b> beyond float32's range at 4.16e9 when summed
    in float32 (clamped, the -inf passed as norm 0 and clip factor 1): summed in float64 it is exact; at 1e20 the
    Gram matrices themselves overflow, and the engine refuses the step."""
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.lin(x[:, :1]) + self.lin(x[:, 1:])

    torch.manual_seed(0)
    model = TwoUses()
    engine = PerExampleGradients(model, max_grad_norm=1.0)
    first = F.normalize(torch.randn(2, 1, 4), dim=-1) * scale
    target = F.normalize(torch.randn(2, 1, 4), dim=-1) * scale
    losses = (model(torch.cat([first, -0.6 * first], 1)) * target).sum((1, 2))
    exact = torch.einsum("bti,btj->bij", target.double(), 0.4 * first.double()).flatten(1).norm(dim=1)
    if scale > 1e19:
        with pytest.raises(NonFiniteGradientError):
            engine.backward(losses)
    else:
        torch.testing.assert_close(engine.backward(losses).double(), exact, rtol=1e-5, atol=0)


def test_tied_norm_includes_cross_term():
    """Norms of the embedding and LM-head uses taken apart differ from the norm of their sum."""
    model = gpt2_lm()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = padded_batch([12, 9], lm=True)
    reference_norms, _ = norms_and_clipped_sum(per_example_grads(model, batch, lm_loss_per_example), 1.0)
    norms = PerExampleGradients(model, 1.0).backward(batch_losses(model, batch, lm_loss_per_example))
    torch.testing.assert_close(norms.double(), reference_norms, rtol=1e-5, atol=0)


def test_accumulates_over_micro_batches():
    model = gpt2_cls()
    batch = padded_batch([12, 7, 3, 10], seed=3)
    engine = PerExampleGradients(model, 0.5)
    for half in (slice(0, 2), slice(2, 4)):
        engine.backward(batch_losses(model, {k: v[half] for k, v in batch.items()}, classification_loss_per_example))
    _, reference_sum = norms_and_clipped_sum(per_example_grads(model, batch, classification_loss_per_example), 0.5)
    params = dict(model.named_parameters())
    for name, ref in reference_sum.items():
        torch.testing.assert_close(params[name].grad.double(), ref, rtol=1e-4, atol=1e-7)


def test_autocast_bf16_matches_fp32_norms():
    model = gpt2_lm()
    batch = padded_batch([12, 7, 3, 10], lm=True)
    reference_norms, _ = norms_and_clipped_sum(per_example_grads(model, batch, lm_loss_per_example), 1.0)
    engine = PerExampleGradients(model, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_losses(model, batch, lm_loss_per_example)
    norms = engine.backward(loss)
    assert norms.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    assert relative_error(norms, reference_norms) < 0.05


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 8), min_size=2, max_size=6), removed=st.integers(0, 5),
       seed=st.integers(0, 1000), max_grad_norm=st.floats(1e-3, 10.0))
def test_neighbouring_batches_differ_by_at_most_the_clip_norm(lengths, removed, seed, max_grad_norm):
    model = gpt2_cls()
    batch = padded_batch(lengths, seq_len=8, seed=seed)
    removed %= len(lengths)
    neighbour = {k: torch.cat([v[:removed], v[removed + 1:]]) for k, v in batch.items()}

    engine = PerExampleGradients(model, max_grad_norm)

    def clipped_sum(data):
        model.zero_grad(set_to_none=True)
        engine.backward(batch_losses(model, data, classification_loss_per_example))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    difference = clipped_sum(batch) - clipped_sum(neighbour)
    engine.detach()
    assert difference.norm().item() <= max_grad_norm * (1 + 1e-4)


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2, 2)


class WithRawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(x * self.scale)


class ReusesWeight(nn.Module):
    """Uses a Linear's weight a second time outside the Linear's forward."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nn.functional.linear(self.proj(x), self.proj.weight)


@pytest.mark.parametrize("model, name", [(WithConv(), "conv.weight"), (WithRawParameter(), "scale")])
def test_unsupported_trainable_layer_is_refused_at_attach(model, name):
    with pytest.raises(UnsupportedParameterError, match=name.replace(".", r"\.")):
        PerExampleGradients(model, 1.0)


def test_frozen_unsupported_layer_is_ignored():
    model = WithConv()
    model.conv.requires_grad_(False)
    PerExampleGradients(model, 1.0)


def test_parameter_used_outside_its_layer_is_refused_at_backward():
    model = ReusesWeight()
    engine = PerExampleGradients(model, 1.0)
    losses = model(torch.randn(3, 4)).sum(1)
    with pytest.raises(UnsupportedParameterError, match=r"proj\.weight"):
        engine.backward(losses)


@pytest.mark.parametrize("max_grad_norm", [1e-7, 1e-3, 1.0, 1e2])
def test_clip_factor_is_exactly_min_one_c_over_the_norm(max_grad_norm):
    """Per-example gradient norms from 1e-8 to 1e3 (a zero one too): the clipped sum is sum_i min(1, C/||g_i||) g_i
    to float64 precision, so an example under C is untouched and one over it has norm C exactly."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double()
    inputs = torch.randn(13, 6, dtype=torch.float64)
    scales = torch.cat([torch.logspace(-8, 3, 12, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    engine = PerExampleGradients(model, max_grad_norm)
    norms = engine.backward(scales * model(inputs)[:, 0])
    grads = scales[:, None] * inputs  # d(s_i w . x_i)/dw
    expected_norms = grads.norm(dim=1)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-12, atol=0)
    factors = torch.where(expected_norms > max_grad_norm, max_grad_norm / expected_norms.clamp_min(1e-300), 1.0)
    torch.testing.assert_close(model.weight.grad[0], (factors[:, None] * grads).sum(0), rtol=1e-12, atol=1e-300)


class HeadWithSharedBias(nn.Module):
    """BERT's MLM head pattern: a module without a rule owns `bias`, the same tensor as its decoder's, and here also
    adds it directly, but only to inputs longer than 4 positions."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(8, 3)
        self.bias = nn.Parameter(torch.randn(3))
        self.decoder.bias = self.bias

    def forward(self, x):
        y = self.decoder(x)
        return y + self.bias if x.shape[1] > 4 else y


def test_a_shared_parameter_is_its_layers_and_a_later_use_outside_it_still_stops_the_run():
    torch.manual_seed(0)
    head = HeadWithSharedBias()
    engine = PerExampleGradients(head, 0.5)  # the shared bias is the decoder's: accepted

    def losses(x):
        return ((head(x) - 1.0) ** 2).sum((1, 2))
    engine.backward(losses(torch.randn(4, 3, 8)))
    with pytest.raises(UnsupportedParameterError, match="'bias' reaches the loss outside a supported layer"):
        engine.backward(losses(torch.randn(4, 6, 8)))  # the direct use appears on the second step only


def test_half_precision_trainable_parameters_are_refused():
    with pytest.raises(UnsupportedParameterError, match="'weight' is torch.bfloat16; keep trainable parameters in"):
        PerExampleGradients(nn.Linear(4, 2).bfloat16(), 1.0)


def test_rms_norm_without_eps_on_bfloat16_inputs_uses_the_eps_torch_uses():
    """torch's rms_norm with eps=None computes half-precision inputs in float32 with float32's epsilon: the rule's
    per-example weight gradient against autograd through F.rms_norm, on small inputs where the epsilon matters."""
    from common.dp.per_example_grads import rule_for
    torch.manual_seed(0)
    layer = nn.RMSNorm(8)
    inputs = (0.05 * torch.randn(3, 5, 8)).bfloat16()
    output_grad = torch.randn(3, 5, 8)
    weight = layer.weight.detach().bfloat16().requires_grad_()
    expected = torch.stack([torch.autograd.grad(F.rms_norm(inputs[i], (8,), weight, None), weight,
                                                output_grad[i].bfloat16())[0].float() for i in range(3)])
    factor = rule_for(layer).factors(layer, inputs, output_grad)[layer.weight]
    torch.testing.assert_close(factor.values, expected, rtol=2e-2, atol=2e-2)

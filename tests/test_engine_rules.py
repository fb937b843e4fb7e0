"""One oracle case per registered layer rule: the engine's per-example norms and clipped sum against brute force
(each example's own loss, differentiated alone in float64). Adding a rule to the registry without a case here
fails `test_every_registered_rule_has_an_oracle_case`; docs/engine.md ("Adding a layer") shows the steps."""

import copy
import importlib

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.dp.per_example_grads import RULES, PerExampleGradients, UnsupportedParameterError, register_rule, rules
from common.dp.per_example_grads.rules import HF_RMS_NORMS
from tests.oracle import assert_engine_matches_brute_force

BATCH, SEQ, WIDTH, VOCAB = 5, 6, 8, 11


class OneLayer(nn.Module):
    """The layer under test, then a frozen random read-out, so every output of the layer reaches the loss."""

    def __init__(self, layer, out_width):
        super().__init__()
        self.layer = layer
        self.readout = nn.Linear(out_width, 3).requires_grad_(False)

    def forward(self, inputs):
        return self.readout(torch.tanh(self.layer(inputs)))


def float_inputs(shape):
    return lambda generator: torch.randn(BATCH, *shape, generator=generator)


def id_inputs(generator):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    ids[:, :2] = 3  # a repeated row within each example: its gradient rows add up
    ids[0, -2:] = 0  # the padding row
    return ids


def hf_class(qualified_name):
    module, name = qualified_name.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def short(qualified_name):
    return qualified_name.rsplit(".", 1)[1]


def attention_masks(generator):
    """Left- and right-padded masks: OPT's learned positions count the unpadded tokens."""
    lengths = torch.randint(2, SEQ + 1, (BATCH,), generator=generator)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    mask[::2] = mask[::2].flip(1)
    return mask


SCALED_EMBEDDINGS = [key for key in RULES if isinstance(key, str) and key.endswith("ScaledWordEmbedding")]
OPT_POSITIONS = "transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding"
BART_POSITIONS = "transformers.models.bart.modeling_bart.BartLearnedPositionalEmbedding"
FALCON_LINEAR = "transformers.models.falcon.modeling_falcon.FalconLinear"

# registry key (a class, or a class's qualified name) -> {case name: (layer factory, input factory, output width)}
CASES = {
    nn.Linear: {"linear": (lambda: nn.Linear(WIDTH, 7), float_inputs((SEQ, WIDTH)), 7),
                "linear_without_bias_2d": (lambda: nn.Linear(WIDTH, 7, bias=False), float_inputs((WIDTH,)), 7)},
    Conv1D: {"conv1d": (lambda: Conv1D(7, WIDTH), float_inputs((SEQ, WIDTH)), 7)},
    nn.Embedding: {"embedding_with_padding": (lambda: nn.Embedding(VOCAB, WIDTH, padding_idx=0), id_inputs, WIDTH)},
    nn.LayerNorm: {"layer_norm": (lambda: nn.LayerNorm(WIDTH), float_inputs((SEQ, WIDTH)), WIDTH),
                   "layer_norm_two_axes": (lambda: nn.LayerNorm((2, 4)), float_inputs((SEQ, 2, 4)), 4)},
    nn.RMSNorm: {"rms_norm": (lambda: nn.RMSNorm(WIDTH, eps=1e-5), float_inputs((SEQ, WIDTH)), WIDTH),
                 "rms_norm_two_axes_default_eps": (lambda: nn.RMSNorm((2, 4)), float_inputs((SEQ, 2, 4)), 4)},
    **{name: {short(name): (lambda name=name: hf_class(name)(WIDTH), float_inputs((SEQ, WIDTH)), WIDTH)}
       for name in HF_RMS_NORMS},
    **{name: {short(name): (lambda name=name: hf_class(name)(VOCAB, WIDTH, 0, 2.5), id_inputs, WIDTH)}
       for name in SCALED_EMBEDDINGS},
    OPT_POSITIONS: {"opt_positions_with_padding": (lambda: hf_class(OPT_POSITIONS)(SEQ, WIDTH), attention_masks,
                                                   WIDTH)},
    BART_POSITIONS: {"bart_positions": (lambda: hf_class(BART_POSITIONS)(SEQ, WIDTH), id_inputs, WIDTH)},
    FALCON_LINEAR: {"falcon_linear": (lambda: hf_class(FALCON_LINEAR)(WIDTH, 7, bias=True),
                                      float_inputs((SEQ, WIDTH)), 7)},
}


def per_example_losses(model, inputs, targets):
    return ((model(inputs) - targets) ** 2).flatten(1).sum(1)


def brute_force(model, inputs, targets):
    """{name: (B, *shape)} per-example gradients: each example's own loss, differentiated alone, in float64."""
    reference = copy.deepcopy(model).double()
    params = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    grads = []
    for i in range(inputs.shape[0]):
        x = inputs[i:i + 1].double() if inputs.is_floating_point() else inputs[i:i + 1]
        loss = per_example_losses(reference, x, targets[i:i + 1].double()).sum()
        grads.append(torch.autograd.grad(loss, list(params.values())))
    return {name: torch.stack([example[k] for example in grads]) for k, name in enumerate(params)}


def check_exact(model, inputs):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        targets = torch.randn(model(inputs).shape, generator=generator)
    assert_engine_matches_brute_force(model, lambda m: per_example_losses(m, inputs, targets),
                                      brute_force(model, inputs, targets))


@pytest.mark.parametrize("layer_type, case", [(t, c) for t, cases in CASES.items() for c in cases],
                         ids=[c for cases in CASES.values() for c in cases])
def test_rule_matches_brute_force(layer_type, case):
    make_layer, make_inputs, out_width = CASES[layer_type][case]
    torch.manual_seed(0)
    layer = make_layer()
    assert type(layer) is layer_type or f"{type(layer).__module__}.{type(layer).__qualname__}" == layer_type
    with torch.no_grad():  # no parameter at a special value (LayerNorm starts at weight 1, bias 0)
        for param in layer.parameters():
            param.add_(0.3 * torch.randn_like(param))
    check_exact(OneLayer(layer, out_width), make_inputs(torch.Generator().manual_seed(0)))


def test_every_registered_rule_has_an_oracle_case():
    assert set(RULES) == set(CASES), "every rule in the registry needs a case in CASES (and every case a rule)"


class SameLinear(nn.Linear):
    """An nn.Linear subclass with the stock forward: refused until a rule says it is a linear layer."""


def test_a_rule_registered_through_the_public_registry(monkeypatch):
    make_inputs = float_inputs((SEQ, WIDTH))
    torch.manual_seed(0)
    model = OneLayer(SameLinear(WIDTH, 7), 7)
    with pytest.raises(UnsupportedParameterError, match="'layer.weight' belongs to SameLinear"):
        PerExampleGradients(model, 1.0)
    monkeypatch.setitem(RULES, SameLinear, RULES[nn.Linear])  # removed again after the test
    register_rule(SameLinear, ("weight", "bias"))(rules.linear)
    assert RULES[SameLinear].factors is rules.linear
    check_exact(model, make_inputs(torch.Generator().manual_seed(0)))


def test_a_rule_refuses_a_configuration_it_cannot_clip():
    model = OneLayer(nn.Embedding(VOCAB, WIDTH, max_norm=1.0), WIDTH)
    with pytest.raises(UnsupportedParameterError, match="'layer'.*max_norm"):
        PerExampleGradients(model, 1.0)


def test_ids_read_from_the_arguments_are_checked_against_the_output(monkeypatch):
    """A rule that reads the looked-up ids from the call's arguments (learned positions) is checked on every call:
    ids that do not give the layer's output (a library's forward that changed) stop the run, naming the layer."""
    rule = RULES[OPT_POSITIONS]
    monkeypatch.setitem(RULES, OPT_POSITIONS, type(rule)(**{**rule.__dict__, "ids": lambda layer, args, kwargs:
                                                               rule.ids(layer, args, kwargs).flip(1)}))
    model = OneLayer(hf_class(OPT_POSITIONS)(SEQ, WIDTH), WIDTH)
    engine = PerExampleGradients(model, 1.0)
    with pytest.raises(UnsupportedParameterError, match="layer 'layer' .* do not give the layer's output"):
        model(attention_masks(torch.Generator().manual_seed(0)))
    engine.detach()

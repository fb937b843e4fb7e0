"""The engine must never clip silently wrong: each layer whose rows are not one example each is either handled
exactly (checked against brute-force per-example gradients) or refused with an error naming it."""

import pytest
import torch
from torch import nn
from transformers import T5Config, T5EncoderModel

from common.dp.per_example_grads import ExampleMixingError, PerExampleGradients


def brute_force(model, forward, examples, max_grad_norm):
    """(norms, clipped sums by parameter name): one backward per example, in float64."""
    reference = {n: p for n, p in model.double().named_parameters() if p.requires_grad}
    grads = []
    for example in examples:
        loss = forward(model, _double(example)).sum()
        grads.append(torch.autograd.grad(loss, list(reference.values())))
    model.float()
    norms = torch.stack([torch.cat([g.flatten() for g in per_param]).norm() for per_param in grads])
    factors = (max_grad_norm / norms).clamp(max=1.0)
    sums = {name: sum(f * g[i] for f, g in zip(factors, grads)) for i, name in enumerate(reference)}
    return norms, sums


def _double(value):
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_double(v) for v in value]
    return value.double() if value.is_floating_point() else value


def assert_exact(model, forward, batch, examples, max_grad_norm=0.5):
    reference_norms, reference_sums = brute_force(model, forward, examples, max_grad_norm)
    engine = PerExampleGradients(model, max_grad_norm)
    norms = engine.backward(forward(model, batch))
    torch.testing.assert_close(norms.double(), reference_norms, rtol=1e-5, atol=1e-7)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad.double(), reference_sums[name], rtol=1e-5, atol=1e-7)
    engine.detach()


def assert_refused(model, forward, batch, layer):
    engine = PerExampleGradients(model, 1.0)
    with pytest.raises(ExampleMixingError, match=f"'{layer}'"):
        engine.backward(forward(model, batch))
    engine.detach()


class Positional(nn.Module):
    """A head over x plus a position embedding looked up in one of several ways."""

    def __init__(self, lookup, width=3, positions=8):
        super().__init__()
        torch.manual_seed(0)
        self.pos, self.head, self.lookup = nn.Embedding(positions, width), nn.Linear(width, 2), lookup

    def forward(self, x):
        steps = torch.arange(x.shape[1])
        position = {"non-batched": lambda: self.pos(steps),                 # (T, d): not per example
                    "broadcast": lambda: self.pos(steps[None]),             # (1, T, d): broadcast over the batch
                    "broadcast, indexed": lambda: self.pos(steps[None])[0],  # (T, d) taken from the broadcast
                    "per example": lambda: self.pos(steps.expand(x.shape[0], -1))}[self.lookup]()
        return self.head(x + position)


def positional_losses(model, x):
    return model(x).pow(2).sum((1, 2))


@pytest.mark.parametrize("lookup", ["non-batched", "broadcast, indexed"])
@pytest.mark.parametrize("seq_len", [4, 5])
def test_position_ids_without_the_batch_axis_are_refused(lookup, seq_len):
    """T == B made the non-batched lookup look batched: engine norms 0.267 x 4 where brute force gives 3.21 ..."""
    x = torch.randn(4, seq_len, 3, generator=torch.Generator().manual_seed(1))
    assert_refused(Positional(lookup), positional_losses, x, "pos")


@pytest.mark.parametrize("lookup", ["broadcast", "per example"])
def test_position_ids_with_the_batch_axis_are_exact(lookup):
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1))
    assert_exact(Positional(lookup), positional_losses, x, [x[i:i + 1] for i in range(4)])


def t5_with_trainable_relative_bias():
    torch.manual_seed(0)
    config = T5Config(vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0,
                      relative_attention_num_buckets=8)
    model = T5EncoderModel(config).eval()
    model.requires_grad_(False)
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    bias.requires_grad_(True)
    return model


def t5_losses(model, ids):
    return model(input_ids=ids).last_hidden_state.pow(2).sum((1, 2))


@pytest.mark.parametrize("seq_len", [4, 6])
def test_t5_relative_attention_bias_is_refused(seq_len):
    ids = torch.randint(1, 30, (4, seq_len), generator=torch.Generator().manual_seed(2))
    assert_refused(t5_with_trainable_relative_bias(), t5_losses, ids,
                   "encoder.block.0.layer.0.SelfAttention.relative_attention_bias")


class DictInput(nn.Module):
    """Called with a dict (or a list) and no tensor argument."""

    def __init__(self, flatten_tokens=None):
        super().__init__()
        torch.manual_seed(0)
        self.head, self.flatten_tokens = nn.Linear(3, 2), flatten_tokens

    def forward(self, inputs):
        x = inputs["x"] if isinstance(inputs, dict) else inputs[0]
        if self.flatten_tokens == "by example":  # every token a row, each example's rows together (OPT)
            return self.head(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], 2)
        if self.flatten_tokens == "by position":  # every token a row, position by position: examples interleaved
            rows = self.head(x.transpose(0, 1).reshape(-1, x.shape[-1]))
            return rows.reshape(x.shape[1], x.shape[0], 2).transpose(0, 1)
        return self.head(x)


def dict_losses(model, inputs):
    return model(inputs).pow(2).sum((1, 2))


@pytest.mark.parametrize("container", [dict, list])
def test_dict_and_list_inputs_are_exact(container):
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(3))

    def wrap(value):
        return {"x": value} if container is dict else [value]
    assert_exact(DictInput(), dict_losses, wrap(x), [wrap(x[i:i + 1]) for i in range(4)])


def test_rows_flattened_example_by_example_are_exact():
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(3))
    assert_exact(DictInput("by example"), dict_losses, {"x": x}, [{"x": x[i:i + 1]} for i in range(4)])


def test_rows_flattened_position_by_position_are_refused():
    """(T * B, d) rows have the batch's row count times T too, but k consecutive rows are not one example's."""
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(3))
    assert_refused(DictInput("by position"), dict_losses, {"x": x}, "head")


class SelectedRows(nn.Module):
    """The head on a selection of the flattened rows: those of `mask` (the real tokens), or every row in an order
    that depends on the data (sorted by a feature)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 2)

    def forward(self, x, mask=None, sort=False):
        rows = x.reshape(-1, x.shape[-1])
        if mask is not None:
            rows = rows[mask.flatten()]
        if sort:
            rows = rows[rows[:, 0].argsort()]
        return self.head(rows)


def test_rows_selected_or_reordered_by_the_data_are_refused_on_any_step():
    """A first step of every row in order passes the probes; a later step of the same pattern whose rows are a
    selection (only the real tokens) or a data-dependent order must still be refused, not grouped wrongly."""
    x = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(5))
    model = SelectedRows()
    engine = PerExampleGradients(model, 1.0)
    engine.backward(model(x).pow(2).sum(1).reshape(4, 3).sum(1))  # every row, in order: exact
    model.zero_grad(set_to_none=True)
    # 8 rows, a multiple of the batch, but not 4 x 3: which rows are an example's depends on the mask
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 0]]).bool()
    with pytest.raises(ExampleMixingError, match="'head' got 8 rows for 4 examples of 3 positions"):
        out = model(x, mask=mask).pow(2).sum(1)
        engine.backward(torch.stack([rows.sum() for rows in out.split([2, 2, 2, 2])]))
    with pytest.raises(ExampleMixingError, match="'head'"):
        out = model(x, sort=True).pow(2).sum(1)
        order = x.reshape(-1, 3)[:, 0].argsort()
        owner = torch.arange(12).div(3, rounding_mode="floor")[order]
        engine.backward(torch.stack([out[owner == i].sum() for i in range(4)]))
    engine.detach()


class Normalised(nn.Module):
    def __init__(self, where):
        super().__init__()
        torch.manual_seed(0)
        self.bn, self.head, self.tail, self.where = nn.BatchNorm1d(3), nn.Linear(3, 3), nn.Linear(3, 2), where
        self.bn.requires_grad_(False)

    def forward(self, x):
        if self.where == "batchnorm":
            return self.tail(self.head(self.bn(x)))
        if self.where == "before":  # batch statistics without a module, before the first trainable layer
            return self.tail(self.head(x - x.mean(0, keepdim=True)))
        hidden = self.head(x)  # after a trainable layer
        return self.tail(hidden - hidden.mean(0, keepdim=True))


def normalised_losses(model, x):
    return model(x).pow(2).sum(1)


def test_frozen_batchnorm_in_train_mode_is_refused():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    model = Normalised("batchnorm").train()
    engine = PerExampleGradients(model, 1.0)
    with pytest.raises(ExampleMixingError, match="'bn' \\(BatchNorm1d\\) in train mode"):
        normalised_losses(model, x)
    engine.detach()
    # in eval mode it normalises with its running statistics: per example, and exact
    model.bn.running_mean.fill_(0.3)
    model.eval()
    assert_exact(model, normalised_losses, x, [x[i:i + 1] for i in range(6)])
    # marked per-example safe by the caller: the module check steps aside, but the input probe still sees the
    # coupling that batch statistics cause and refuses the layer it feeds
    engine = PerExampleGradients(model.train(), 1.0, per_example_safe=["bn"])
    with pytest.raises(ExampleMixingError, match="'head': its input for other examples changed"):
        engine.backward(normalised_losses(model, x))


@pytest.mark.parametrize("where, layer", [("before", "head"), ("after", "head")])
def test_batch_statistics_outside_any_module_are_refused(where, layer):
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(4))
    assert_refused(Normalised(where), normalised_losses, x, layer)


class MultiDimLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.head = nn.LayerNorm((2, 2)), nn.Linear(4, 2)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.norm(x).flatten(2))


def test_layer_norm_over_several_dimensions_is_exact():
    x = torch.randn(3, 5, 2, 2, generator=torch.Generator().manual_seed(5))
    assert_exact(MultiDimLayerNorm(), lambda model, x: model(x).pow(2).sum((1, 2)), x,
                 [x[i:i + 1] for i in range(3)])


def test_a_summed_loss_is_refused():
    model = DictInput()
    engine = PerExampleGradients(model, 1.0)
    with pytest.raises(ValueError, match="per-example losses"):
        engine.backward(dict_losses(model, {"x": torch.randn(4, 4, 3)}).sum())

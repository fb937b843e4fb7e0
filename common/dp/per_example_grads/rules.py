"""The public registry of layer rules: everything the engine knows about a layer type.

A rule turns one forward call of a layer into per-example gradient factors of its parameters:
`(layer, input (B, T, in), output_grad (B, T, out)) -> {parameter: factor}` (factors.py), with the
input and output gradient flattened to one sequence axis and one feature axis. Adding a layer type
is one `@register_rule` function here (or in user code) plus one case in tests/test_engine_rules.py;
docs/engine.md ("Adding a layer") walks through it.

Rules match exact types only: a subclass may change `forward()`, so it needs a rule of its own
(which may reuse the parent's function).
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from common.dp.per_example_grads.factors import Dense, Outer, Rows, f32


@dataclass(frozen=True)
class LayerRule:
    """How the engine handles one layer type.

    `factors`: the rule proper (see the module docstring). `parameters`: the names of the layer's own
    parameters the rule covers; a trainable parameter not named here is refused. `feature_dims(layer)`:
    how many trailing axes of the input and of the output are features (the rest, after the batch axis,
    are flattened into the sequence axis). `lookup(layer, ids)`: for layers fed integer ids (embeddings):
    the input has no feature axis and the output one, and ids broadcast over the batch (shape (1, T)) are
    looked up per example with it. `ids(layer, args, kwargs)`: for embeddings whose forward computes the ids it
    looks up from its arguments (learned positions with an offset): those ids; the engine checks on every call that
    looking them up gives the layer's output. `check(layer)`: why this instance cannot be handled, or None."""

    layer_type: type
    factors: Callable
    parameters: tuple
    feature_dims: Callable = lambda layer: 1
    lookup: Optional[Callable] = None
    check: Optional[Callable] = None
    ids: Optional[Callable] = None

    def input_feature_dims(self, layer):
        return 0 if self.lookup is not None else self.feature_dims(layer)

    def output_feature_dims(self, layer):
        return 1 if self.lookup is not None else self.feature_dims(layer)


RULES: dict = {}


def register_rule(layer_type, parameters, feature_dims=None, lookup=None, check=None, ids=None):
    """Decorator: `factors_fn` becomes the rule for `layer_type` (replacing any earlier one): a class, or its
    qualified name `module.Class` (a class of a library that need not be imported to register it)."""
    def register(factors_fn):
        rule = LayerRule(layer_type, factors_fn, tuple(parameters), lookup=lookup, check=check, ids=ids,
                         **({} if feature_dims is None else {"feature_dims": feature_dims}))
        RULES[layer_type] = rule
        return factors_fn
    return register


def rule_for(layer):
    """The rule for this layer's exact type (by class, or by qualified name), or None."""
    kind = type(layer)
    return RULES.get(kind) or RULES.get(f"{kind.__module__}.{kind.__qualname__}")


def rule_name(key):
    """A registry key as a short name: the class's name."""
    return key.rsplit(".", 1)[-1] if isinstance(key, str) else key.__name__


@register_rule(nn.Linear, ("weight", "bias"))
def linear(layer, activation, output_grad):
    factors = {layer.weight: Outer(output_grad, activation)}
    if layer.bias is not None:
        factors[layer.bias] = Dense(f32(output_grad).sum(1))
    return factors


@register_rule(Conv1D, ("weight", "bias"))
def conv1d(layer, activation, output_grad):
    # transformers' Conv1D stores the weight transposed: (in, out), y = x W + b.
    return {layer.weight: Outer(activation, output_grad), layer.bias: Dense(f32(output_grad).sum(1))}


def _embedding_lookup(layer, ids):
    return F.embedding(ids, layer.weight, layer.padding_idx)


def _embedding_check(layer):
    if layer.max_norm is not None or layer.scale_grad_by_freq or layer.sparse:
        return "nn.Embedding with max_norm, scale_grad_by_freq or sparse gradients is not supported"
    return None


@register_rule(nn.Embedding, ("weight",), lookup=_embedding_lookup, check=_embedding_check)
def embedding(layer, ids, output_grad):
    if layer.padding_idx is not None:
        # torch leaves the padding row's gradient at zero; so must the per-example one.
        output_grad = output_grad * (ids != layer.padding_idx)[:, :, None]
    return {layer.weight: Rows(ids, output_grad, layer.num_embeddings)}


@register_rule(nn.LayerNorm, ("weight", "bias"), feature_dims=lambda layer: len(layer.normalized_shape))
def layer_norm(layer, activation, output_grad):
    shape = layer.normalized_shape
    # the normalised dimensions arrive flattened into one feature axis
    normalised = F.layer_norm(f32(activation), (activation.shape[-1],), eps=layer.eps)
    grad = f32(output_grad)
    factors = {layer.weight: Dense((grad * normalised).sum(1).unflatten(1, shape))}
    if layer.bias is not None:
        factors[layer.bias] = Dense(grad.sum(1).unflatten(1, shape))
    return factors


def _rms_normalised(activation, eps):
    x = f32(activation)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_rule(eps_of):
    """The rule of an RMSNorm whose output is weight * x / rms(x), or (1 + weight) * x / rms(x) (the same gradient),
    normalised in float32 as the models do; `eps_of(layer, activation)` reads the layer's epsilon."""
    def rms_norm(layer, activation, output_grad):
        normalised = _rms_normalised(activation, eps_of(layer, activation))
        return {layer.weight: Dense((f32(output_grad) * normalised).sum(1).unflatten(1, layer.weight.shape))}
    return rms_norm


def _torch_rms_eps(layer, activation):
    if layer.eps is not None:
        return layer.eps
    # F.rms_norm's default: the machine epsilon of the dtype it computes in, float32 for half-precision inputs
    dtype = activation.dtype if activation.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.finfo(dtype).eps


register_rule(nn.RMSNorm, ("weight",), feature_dims=lambda layer: len(layer.normalized_shape))(
    rms_norm_rule(_torch_rms_eps))

# Hugging Face's RMSNorm classes, one per model family, by qualified name (no model module is imported for it);
# each is exact against brute force in tests/test_model_zoo.py with every parameter trainable.
HF_RMS_NORMS = {  # class -> the attribute holding its epsilon
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": "variance_epsilon",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": "variance_epsilon",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": "variance_epsilon",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm": "variance_epsilon",
    "transformers.models.phi3.modeling_phi3.Phi3RMSNorm": "variance_epsilon",
    "transformers.models.smollm3.modeling_smollm3.SmolLM3RMSNorm": "variance_epsilon",
    "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm": "variance_epsilon",
    "transformers.models.granite.modeling_granite.GraniteRMSNorm": "variance_epsilon",
    "transformers.models.t5.modeling_t5.T5LayerNorm": "variance_epsilon",
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": "eps",  # (1 + weight)
    "transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm": "eps",
    "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm": "eps",
}
for _name, _attribute in HF_RMS_NORMS.items():
    register_rule(_name, ("weight",))(rms_norm_rule(lambda layer, activation, attribute=_attribute:
                                                    getattr(layer, attribute)))


def _embed_scale(layer):
    """The factor a scaled word embedding multiplies its rows by: Gemma's buffer, cast to the weight's dtype as its
    forward does, or BART's float."""
    scale = layer.embed_scale
    return scale.to(layer.weight.dtype) if isinstance(scale, torch.Tensor) else scale


def _scaled_embedding_lookup(layer, ids):
    return F.embedding(ids, layer.weight, layer.padding_idx) * _embed_scale(layer)


def scaled_embedding(layer, ids, output_grad):
    """An embedding whose forward multiplies the looked-up rows by a constant: the output gradient, scaled."""
    rows = embedding(layer, ids, output_grad)[layer.weight]
    return {layer.weight: Rows(rows.ids, rows.values * _embed_scale(layer), rows.num_rows)}


for _name in ("transformers.models.gemma.modeling_gemma.GemmaTextScaledWordEmbedding",
              "transformers.models.gemma2.modeling_gemma2.Gemma2TextScaledWordEmbedding",
              "transformers.models.gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding",
              "transformers.models.bart.modeling_bart.BartScaledWordEmbedding"):
    register_rule(_name, ("weight",), lookup=_scaled_embedding_lookup, check=_embedding_check)(scaled_embedding)

# nn.Linear subclasses whose forward is x W^T + b written out: the linear rule
register_rule("transformers.models.falcon.modeling_falcon.FalconLinear", ("weight", "bias"))(linear)


def _argument(args, kwargs, position, name, default=None):
    return args[position] if len(args) > position else kwargs.get(name, default)


def _opt_position_ids(layer, args, kwargs):
    """OPT's learned positions: the position of each token among the unpadded ones (from the attention mask), plus
    the table's offset of 2."""
    position_ids = _argument(args, kwargs, 2, "position_ids")
    if position_ids is None:
        mask = _argument(args, kwargs, 0, "attention_mask")
        position_ids = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, _argument(args, kwargs, 1,
                                                                               "past_key_values_length", 0):]
    return position_ids + layer.offset


def _bart_position_ids(layer, args, kwargs):
    """BART's learned positions: 0..T-1 after any cached length (or the given position ids), plus the offset of 2."""
    position_ids = _argument(args, kwargs, 2, "position_ids")
    if position_ids is not None:
        return position_ids.unsqueeze(0) + layer.offset
    input_ids, past = _argument(args, kwargs, 0, "input_ids"), _argument(args, kwargs, 1, "past_key_values_length", 0)
    batch, seq_len = input_ids.shape[:2]
    return (torch.arange(past, past + seq_len, device=layer.weight.device) + layer.offset).expand(batch, -1)


for _name, _ids in (("transformers.models.opt.modeling_opt.OPTLearnedPositionalEmbedding", _opt_position_ids),
                    ("transformers.models.bart.modeling_bart.BartLearnedPositionalEmbedding", _bart_position_ids)):
    register_rule(_name, ("weight",), lookup=_embedding_lookup, check=_embedding_check, ids=_ids)(embedding)

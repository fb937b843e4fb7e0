"""The batch-axis probes: proof that every stored row of a layer belongs to one example.

`backward` takes the per-example losses L (B,), so the
batch size is B = len(L), never guessed from a layer's input. The engine assumes
that row i of every stored layer input and output belongs to example i alone: the
input row is a function of example i's model inputs only, and the loss of example
k does not depend on output row i for k != i. Shapes cannot prove that (a (T, d)
input looks batched when T == B), so on the first backward, and again whenever the
pattern of layer uses changes (which layers ran, their ranks, which of their axes
have length B), two probes check it:
  * gradient probe: with random signs r in {-1, +1}^B, one more backward pass (to
    the layer outputs only) gives d(r . L)/d out. If the Jacobian of L with respect
    to the output rows is block-diagonal, row i of it is exactly r_i times row i of
    d(sum L)/d out (negation is exact in floating point). Any term of another
    example k's loss in row i adds (r_k - r_i) dL_k/d out_i, which is not zero for
    a random choice of signs unless the terms cancel, probability at most 1/2 per
    coupled example and far smaller in practice. It catches layers looked up with
    non-batched ids (T5's relative bias, wpe(arange(T)), sequence-first tensors),
    outputs that are indexed or broadcast across the batch, and any coupling of
    examples downstream of a hooked layer.
  * input probe: two forward passes without gradients from the same random state,
    one with example B-1's model inputs perturbed (floating tensors get noise,
    integer ones are rolled along their last axis); every other example's stored
    layer inputs must stay the same. It catches coupling upstream of a layer, such
    as normalisation over the batch on the model's inputs.
A layer that fails either probe stops the run with an error naming it. The probes
run on the first step and on pattern changes only: a steady-state step pays for
computing the pattern (a tuple of a few integers per layer use), not the probes.
The cost of a probing step is one backward pass to the layer outputs and two
forward passes without gradients.
"""

import torch

from common.dp.per_example_grads.errors import ExampleMixingError
from common.dp.per_example_grads.factors import f32

BATCH_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "pixel_values")


def _tensors_in(value, depth=2):
    """The tensors in a model argument: itself, or inside a dict, list or tuple (two levels down)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, dict):
        keyed = [value[k] for k in BATCH_KEYS if isinstance(value.get(k), torch.Tensor)]
        return keyed + [t for v in value.values() for t in _tensors_in(v, depth - 1)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v, depth - 1)]
    return []


def batch_size_of(args, kwargs):
    """The batch size of a model call, read from its inputs (needed only to expand broadcast ids)."""
    keyed = [kwargs[k] for k in BATCH_KEYS if isinstance(kwargs.get(k), torch.Tensor)]
    for tensor in keyed + _tensors_in(list(args) + list(kwargs.values())):
        if tensor.dim() > 0:
            return tensor.shape[0]
    return None


def sequence_length_of(args, kwargs):
    """The sequence length of a model call (the second axis of its first batched tensor of two or more axes), or
    None: what rows flattened across the batch must number per example."""
    keyed = [kwargs[k] for k in BATCH_KEYS if isinstance(kwargs.get(k), torch.Tensor)]
    for tensor in keyed + _tensors_in(list(args) + list(kwargs.values())):
        if tensor.dim() > 1:
            return tensor.shape[1]
    return None


def _map_tensors(value, function, depth=2):
    """`value` with `function` applied to every tensor in it (as `_tensors_in` finds them)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if depth == 0:
        return value
    if isinstance(value, dict):
        return {k: _map_tensors(v, function, depth - 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, function, depth - 1) for v in value)
    return value


def _perturb_example(tensor, batch, index, generator):
    """`tensor` with example `index`'s row changed, if its first axis is the batch; other rows untouched."""
    if tensor.dim() == 0 or tensor.shape[0] != batch:
        return tensor
    changed = tensor.clone()
    if tensor.is_floating_point():
        scale = tensor.detach().float().abs().mean().clamp_min(1.0)
        noise = torch.randn(tensor.shape[1:], generator=generator).to(tensor.device, tensor.dtype)
        changed[index] = tensor[index] + noise * scale
    elif tensor.dim() > 1:
        changed[index] = tensor[index].roll(1, -1)
    return changed


def use_pattern(uses, batch):
    """What the batch-axis probes depend on: the layers used, their ranks, and which axes have length B."""
    return tuple((use.name, tuple(size == batch for size in use.inputs.shape),
                  tuple(size == batch for size in use.output.shape)) for use in uses)


def check_batch_axis(uses, batch):
    """Refuse a stored input or output whose first axis is not the batch of `batch` per-example losses, nor the
    batch's rows flattened with k rows each (B * k, as OPT flattens tokens before its feed-forward: the probes then
    prove that each run of k rows is one example's), or whose input and output disagree on it."""
    for use in uses:
        for what, tensor, feature_dims in (("input", use.inputs, use.rule.input_feature_dims(use.layer)),
                                           ("output", use.output, use.rule.output_feature_dims(use.layer))):
            if (tensor.dim() < feature_dims + 1 or tensor.shape[0] % batch or tensor.shape[0] == 0
                    or tensor.shape[0] != use.inputs.shape[0]):
                raise ExampleMixingError(
                    f"layer '{use.name}' got an {what} of shape {tuple(tensor.shape)} whose first axis is not "
                    f"the batch ({batch} per-example losses) or its rows, so its trainable parameters have no "
                    "per-example gradients")


def gradient_probe(losses, uses, output_grads, seed=0):
    """Refuse a layer whose output rows receive gradient from other examples' losses (the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (losses.shape[0],), generator=generator) * 2 - 1).to(losses.device, losses.dtype)
    probed = torch.autograd.grad(losses, [use.output for use in uses], grad_outputs=signs, allow_unused=True)
    for use, plain, signed in zip(uses, output_grads, probed):
        if plain is None or signed is None:
            continue
        plain, signed = f32(plain).reshape(losses.shape[0], -1), f32(signed).reshape(losses.shape[0], -1)
        leak = (signed - signs.float()[:, None] * plain).norm(dim=1)
        scale = plain.norm(dim=1).max().clamp_min(1e-30)
        if (leak > 1e-4 * scale).any():
            raise ExampleMixingError(
                f"layer '{use.name}': the gradient at its output row of example {int(leak.argmax())} comes from "
                "other examples' losses too, so its rows are not one example each (an input looked up or "
                "computed without the batch axis, e.g. embedding(arange(T)) when T equals the batch size; an "
                "output indexed or shared across the batch; or examples coupled after this layer); its "
                "per-example gradients cannot be clipped")


def input_probe(capture, call, batch):
    """Refuse a layer whose input rows change when only another example's model inputs change.

    `capture(args, kwargs)` runs the model without gradients and returns the (layer name, input) of every
    hooked layer call; `call` is the (args, kwargs) of the step's forward."""
    args, kwargs = call
    generator = torch.Generator().manual_seed(batch)
    changed = batch - 1

    def perturb(tensor):
        return _perturb_example(tensor, batch, changed, generator)
    captured = [capture(args, kwargs), capture(_map_tensors(args, perturb), _map_tensors(kwargs, perturb))]
    others = torch.arange(batch) != changed
    for (name, before), (name_after, after) in zip(*captured):
        if name != name_after or before.shape != after.shape or before.dim() == 0 or before.shape[0] % batch:
            continue
        before, after = f32(before).unflatten(0, (batch, -1))[others], f32(after).unflatten(0, (batch, -1))[others]
        if not torch.allclose(before, after, rtol=1e-4, atol=1e-6 * before.abs().max().clamp_min(1.0).item()):
            raise ExampleMixingError(
                f"layer '{name}': its input for other examples changed when only example {changed}'s model inputs "
                "changed, so the model couples examples before this layer (e.g. normalisation over the batch); "
                "its per-example gradients cannot be clipped")

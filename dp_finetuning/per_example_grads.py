"""Exact per-example gradient clipping for stock PyTorch and Hugging Face models.

The engine attaches from outside with forward hooks. Each forward call of a
supported layer with trainable parameters stores its input and its output.
`PerExampleGradients.backward(losses)` then asks autograd for the gradients of
those outputs only, so autograd never computes the summed weight gradients
(wasted work in a DP step). From the stored inputs and output gradients it
computes every example's gradient norm over all trainable parameters together
(ghost norms from Gram matrices, or materialised per-example gradients when
that is cheaper), the flat clip factors c_i = min(1, C / ||g_i||), and the
clipped sum  sum_i c_i g_i  as one weighted GEMM per layer ("book-keeping").

A per-example gradient of one use of a parameter is held as a factor:
  Outer(left, right): G_i = left_i^T right_i     (linear layers, no T x p x d tensor)
  Rows(ids, values):  G_i[r] = sum_{t: ids_t = r} values_t  (embeddings, no V x d tensor)
  Dense(values):      G_i = values_i              (biases, LayerNorm, small layers)
A parameter used more than once (GPT-2's token embedding tied to its LM head)
has one per-example gradient, the sum over its uses, so its squared norm
includes the cross terms 2 <G_u, G_v> between uses.

Anything the engine cannot clip exactly stops the run with an error naming the
parameter or layer: a trainable parameter of an unsupported layer type (at attach),
a trainable parameter reaching the loss outside a supported layer (at the first
backward), a module that couples examples in its forward (BatchNorm in train mode,
at its forward), and a layer whose stored rows are not one example each (below).

Proof of the batch axis. `backward` takes the per-example losses L (B,), so the
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class UnsupportedParameterError(RuntimeError):
    """A trainable parameter whose per-example gradient cannot be clipped exactly."""


class ExampleMixingError(UnsupportedParameterError):
    """A layer whose stored rows are not one example each: the model couples examples or the batch axis is not
    the examples' axis."""


class NonFiniteGradientError(ValueError):
    """A per-example loss or gradient norm that is NaN or infinite: its clip factor would make the whole clipped
    sum non-finite, and the released model would reveal that the example was there."""

    def __init__(self, quantity, examples):
        self.quantity, self.examples = quantity, examples
        super().__init__(f"non-finite per-example {quantity} for example(s) {examples[:5]} of the batch")


# Modules whose forward in train mode couples the examples of a batch (batch statistics).
BATCH_COUPLING_MODULES = (nn.modules.batchnorm._BatchNorm,)


# Per-example gradients materialised only for their norm are built this many elements at a time.
MATERIALISE_CHUNK_ELEMENTS = 2 ** 22


def _f32(tensor):
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


@dataclass
class Outer:
    """G_i = left_i^T right_i with left (B, T, R) and right (B, T, K): a linear layer's weight."""

    left: torch.Tensor
    right: torch.Tensor
    norm_by_materialising: bool = False  # chosen by _plan_linear_factors

    def costs(self):
        """Per example: (ghost norm flops, materialising flops, bytes of the materialised gradient)."""
        _, seq_len, left_width = self.left.shape
        right_width = self.right.shape[2]
        return (2 * seq_len * seq_len * (left_width + right_width), 2 * seq_len * left_width * right_width,
                4 * left_width * right_width)

    def materialise(self):
        return Dense(torch.bmm(_f32(self.left).transpose(1, 2), _f32(self.right)))

    def sq_norm_by_materialising(self):
        """Squared norms from per-example gradients materialised a slice of the wider side at a time."""
        left, right = _f32(self.left), _f32(self.right)
        if left.shape[2] < right.shape[2]:
            left, right = right, left
        batch, _, width = left.shape
        step = max(1, MATERIALISE_CHUNK_ELEMENTS // (batch * right.shape[2]))
        total = None
        for start in range(0, width, step):
            block = torch.bmm(left[:, :, start:start + step].transpose(1, 2), right)
            part = _batched_dot(block, block)
            total = part if total is None else total + part
        return total

    def weighted_sum(self, weights):
        # Scale the narrower side: for an LM head left is B x T x vocab.
        left, right = _f32(self.left), _f32(self.right)
        if left.shape[2] <= right.shape[2]:
            left = left * weights[:, None, None]
        else:
            right = right * weights[:, None, None]
        return left.flatten(0, 1).T @ right.flatten(0, 1)


@dataclass
class Rows:
    """G_i[r] = sum over positions t with ids_it = r of values_it: an embedding table."""

    ids: torch.Tensor
    values: torch.Tensor
    num_rows: int

    def weighted_sum(self, weights):
        scaled = _f32(self.values) * weights[:, None, None]
        out = scaled.new_zeros(self.num_rows, scaled.shape[2])
        return out.index_add_(0, self.ids.flatten(), scaled.flatten(0, 1))


@dataclass
class Dense:
    """Materialised per-example gradients, values (B, *parameter shape)."""

    values: torch.Tensor

    def weighted_sum(self, weights):
        return torch.einsum("b,b...->...", weights, _f32(self.values))


class _GramCache:
    """Per-example Gram matrices x_i x_i^T, reused by consecutive layers reading the same
    tensor (BERT's query, key and value); only the newest few are kept, to bound memory."""

    def __init__(self, size=2):
        self._grams = {}
        self._size = size

    def __call__(self, tensor):
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in self._grams:
            x = _f32(tensor)
            self._grams[key] = torch.bmm(x, x.transpose(1, 2))
            if len(self._grams) > self._size:
                del self._grams[next(iter(self._grams))]
        return self._grams[key]


def _sq_norm(factor, gram):
    """Per-example squared Frobenius norm of one factor, shape (B,)."""
    if isinstance(factor, Outer):
        if factor.norm_by_materialising:
            return factor.sq_norm_by_materialising()
        return _batched_dot(gram(factor.left), gram(factor.right))
    if isinstance(factor, Rows):
        same_row = factor.ids[:, :, None] == factor.ids[:, None, :]
        return (gram(factor.values) * same_row).sum((1, 2))
    values = _f32(factor.values)
    return _batched_dot(values, values)


def _plan_linear_factors(factors, budget_bytes):
    """Choose, per linear-layer factor, how its norm and clipped sum are computed, by estimated cost.

    Per example with sequence length T, widths R and K, the ghost norm costs 2 T^2 (R + K) flops
    and materialising the gradient 2 T R K; either way the clipped sum is then one GEMM over the
    sequence (2 T R K). A gradient kept materialised needs no GEMM for the clipped sum (2 R K for a
    weighted sum instead) but holds 4 R K bytes until the end of the step. So every factor takes
    the cheaper norm, and factors are kept materialised where that needs no more memory than
    their Gram matrices, then by time saved per byte while the kept bytes fit `budget_bytes`.
    """
    ranked = []
    for uses_of_param in factors.values():
        for index, factor in enumerate(uses_of_param):
            if not isinstance(factor, Outer):
                continue
            ghost, materialising, nbytes = factor.costs()
            factor.norm_by_materialising = materialising < ghost
            batch, seq_len = factor.left.shape[:2]
            if nbytes <= 8 * seq_len * seq_len:  # no larger than the two Gram matrices
                uses_of_param[index] = factor.materialise()
                continue
            saving = min(ghost, materialising) - 2 * nbytes // 4
            if saving > 0:
                ranked.append((saving / nbytes, batch * nbytes, uses_of_param, index))
    ranked.sort(key=lambda candidate: -candidate[0])
    for _, nbytes, uses_of_param, index in ranked:
        if nbytes <= budget_bytes:
            uses_of_param[index] = uses_of_param[index].materialise()
            budget_bytes -= nbytes


def _batched_dot(x, y):
    """sum over all but the first axis of x * y, without the x * y temporary."""
    return torch.bmm(x.reshape(x.shape[0], 1, -1), y.reshape(y.shape[0], -1, 1)).flatten()


def _gather_rows(table, ids):
    """table (B, S, R), ids (B, T) -> table[b, s, ids[b, t]] as (B, S, T)."""
    return torch.gather(table, 2, ids[:, None, :].expand(-1, table.shape[1], -1))


def _inner_outer_outer(f, h):
    left = torch.bmm(_f32(f.left), _f32(h.left).transpose(1, 2))
    right = torch.bmm(_f32(f.right), _f32(h.right).transpose(1, 2))
    return _batched_dot(left, right)


def _inner_outer_rows(f, h):
    # <left^T right, rows> = sum_{s,t} left[s, id_t] (right_s . values_t)
    picked = _gather_rows(_f32(f.left), h.ids)
    return (picked * torch.bmm(_f32(f.right), _f32(h.values).transpose(1, 2))).sum((1, 2))


def _inner_outer_dense(f, h):
    return torch.einsum("brk,btr,btk->b", _f32(h.values), _f32(f.left), _f32(f.right))


def _inner_rows_rows(f, h):
    same_row = f.ids[:, :, None] == h.ids[:, None, :]
    return (torch.bmm(_f32(f.values), _f32(h.values).transpose(1, 2)) * same_row).sum((1, 2))


def _inner_rows_dense(f, h):
    picked = torch.gather(_f32(h.values), 1, f.ids[:, :, None].expand(-1, -1, h.values.shape[2]))
    return (picked * _f32(f.values)).sum((1, 2))


def _inner_dense_dense(f, h):
    return (_f32(f.values).flatten(1) * _f32(h.values).flatten(1)).sum(1)


_INNER = {
    (Outer, Outer): _inner_outer_outer,
    (Outer, Rows): _inner_outer_rows,
    (Outer, Dense): _inner_outer_dense,
    (Rows, Rows): _inner_rows_rows,
    (Rows, Dense): _inner_rows_dense,
    (Dense, Dense): _inner_dense_dense,
}


def _inner(f, h):
    """Per-example inner product <G_f,i, G_h,i> of two uses of one parameter, shape (B,)."""
    if (type(f), type(h)) in _INNER:
        return _INNER[type(f), type(h)](f, h)
    return _INNER[type(h), type(f)](h, f)


# One small function per layer type: (layer, input (B, T, ...), output grad (B, T, ...))
# -> {parameter: factor}. Inputs and output grads arrive flattened to one sequence axis.


def _linear(layer, activation, output_grad):
    factors = {layer.weight: Outer(output_grad, activation)}
    if layer.bias is not None:
        factors[layer.bias] = Dense(_f32(output_grad).sum(1))
    return factors


def _conv1d(layer, activation, output_grad):
    # transformers' Conv1D stores the weight transposed: (in, out), y = x W + b.
    return {layer.weight: Outer(activation, output_grad), layer.bias: Dense(_f32(output_grad).sum(1))}


def _embedding(layer, ids, output_grad):
    if layer.padding_idx is not None:
        # torch leaves the padding row's gradient at zero; so must the per-example one.
        output_grad = output_grad * (ids != layer.padding_idx)[:, :, None]
    return {layer.weight: Rows(ids, output_grad, layer.num_embeddings)}


def _layer_norm(layer, activation, output_grad):
    shape = layer.normalized_shape
    # the normalised dimensions arrive flattened into one feature axis
    normalised = F.layer_norm(_f32(activation), (activation.shape[-1],), eps=layer.eps)
    grad = _f32(output_grad)
    factors = {layer.weight: Dense((grad * normalised).sum(1).unflatten(1, shape))}
    if layer.bias is not None:
        factors[layer.bias] = Dense(grad.sum(1).unflatten(1, shape))
    return factors


# layer type -> (factor rule, names of the parameters it handles); exact types only,
# since a subclass may change forward().
RULES = {
    nn.Linear: (_linear, ("weight", "bias")),
    Conv1D: (_conv1d, ("weight", "bias")),
    nn.Embedding: (_embedding, ("weight",)),
    nn.LayerNorm: (_layer_norm, ("weight", "bias")),
}


def _flatten_sequence(tensor, feature_dims):
    """(B, ..., *features) -> (B, T, prod(features)); T = 1 for 2-D inputs."""
    batch = tensor.shape[0]
    if feature_dims == 0:
        return tensor.reshape(batch, -1)
    return tensor.reshape(batch, -1, *tensor.shape[tensor.dim() - feature_dims:]).flatten(2)


def _feature_dims(layer):
    if isinstance(layer, nn.LayerNorm):
        return len(layer.normalized_shape)
    return 0 if isinstance(layer, nn.Embedding) else 1


@dataclass
class _Use:
    layer: nn.Module
    name: str
    inputs: torch.Tensor
    output: torch.Tensor
    input_version: int
    output_version: int


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


def _batch_size_of(args, kwargs):
    """The batch size of a model call, read from its inputs (needed only to expand broadcast ids)."""
    keyed = [kwargs[k] for k in BATCH_KEYS if isinstance(kwargs.get(k), torch.Tensor)]
    for tensor in keyed + _tensors_in(list(args) + list(kwargs.values())):
        if tensor.dim() > 0:
            return tensor.shape[0]
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


def _bytes_in_play(uses, output_grads, factors):
    """Memory a step holds anyway: stored layer inputs and outputs, their gradients, and four copies of the
    trainable parameters (weights, gradients, two optimiser moments)."""
    tensors = {}
    for tensor in [t for use in uses for t in (use.inputs, use.output)] + [g for g in output_grads if g is not None]:
        tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(tensors.values()) + 4 * sum(p.numel() * p.element_size() for p in factors)


def _use_pattern(uses, batch):
    """What the batch-axis probes depend on: the layers used, their ranks, and which axes have length B."""
    return tuple((use.name, tuple(size == batch for size in use.inputs.shape),
                  tuple(size == batch for size in use.output.shape)) for use in uses)


def _refuse_non_finite(quantity, values):
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        raise NonFiniteGradientError(quantity, (~finite).nonzero().flatten().tolist())


class PerExampleGradients:
    """Hooks a model so that `backward(losses)` writes the flat-clipped sum of per-example gradients.

    `losses` are the per-example losses, shape (B,) (not their sum or mean), so that example
    i's gradient is the gradient of its own loss. After `backward`, each trainable parameter's
    `.grad` holds (accumulates) sum_i c_i g_i with c_i = min(1, max_grad_norm / ||g_i||),
    the norm taken over all trainable parameters together; no noise is added here.

    `per_example_safe`: modules (or their names) that the engine would refuse as coupling
    examples (BatchNorm in train mode) but that the caller knows to be per-example here.
    `materialise_budget`: the memory for per-example gradients kept materialised to save time,
    as a fraction of what the step holds anyway (see `_plan_linear_factors`).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, per_example_safe=(), materialise_budget=0.1):
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.materialise_budget = float(materialise_budget)
        self._param_names = {}
        self._hooked = {}
        self._check_parameters()
        self._uses = []
        self._call = None
        self._batch_size = None
        self._capture = None
        self._graph_checked = False
        self._probed_patterns = set()
        self._handles = [model.register_forward_pre_hook(self._start_forward, with_kwargs=True)]
        for layer, name in self._hooked.items():
            self._handles.append(layer.register_forward_hook(self._store_use))
        safe = {m for m in per_example_safe if isinstance(m, nn.Module)}
        safe_names = {m for m in per_example_safe if isinstance(m, str)}
        for name, module in model.named_modules():
            if isinstance(module, BATCH_COUPLING_MODULES) and module not in safe and name not in safe_names:
                self._handles.append(module.register_forward_pre_hook(self._refuse_batch_coupling(name)))

    @staticmethod
    def _refuse_batch_coupling(name):
        def refuse(module, inputs):
            if module.training and torch.is_grad_enabled():
                raise ExampleMixingError(
                    f"module '{name}' ({type(module).__name__}) in train mode normalises with the batch's statistics, "
                    "so every example's output depends on the others and per-example clipping does not bound "
                    "one example's influence; put it in eval mode (module.eval()), replace it (GroupNorm, "
                    "LayerNorm), or pass it in per_example_safe if it only ever sees one example")
        return refuse

    def _check_parameters(self):
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if param.requires_grad:
                self._param_names.setdefault(param, name)
        for layer_name, layer in self.model.named_modules(remove_duplicate=False):
            trainable = [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
            if not trainable:
                continue
            rule = RULES.get(type(layer))
            for local_name, param in trainable:
                full_name = f"{layer_name}.{local_name}" if layer_name else local_name
                if rule is None or local_name not in rule[1]:
                    raise UnsupportedParameterError(
                        f"trainable parameter '{full_name}' belongs to {type(layer).__name__}, which has no "
                        f"exact per-example gradient rule (supported: {', '.join(t.__name__ for t in RULES)}); "
                        "freeze it (requires_grad=False) or replace the layer")
            if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.scale_grad_by_freq
                                                    or layer.sparse):
                raise UnsupportedParameterError(
                    f"trainable parameter '{layer_name}.weight': nn.Embedding with max_norm, "
                    "scale_grad_by_freq or sparse gradients is not supported")
            self._hooked[layer] = layer_name

    def _start_forward(self, module, args, kwargs):
        if torch.is_grad_enabled() and self._capture is None:
            self._uses = []
            self._call = (args, kwargs)
        self._batch_size = _batch_size_of(args, kwargs)

    def _store_use(self, layer, inputs, output):
        if not torch.is_grad_enabled() and self._capture is None:
            return None
        name = self._hooked[layer]
        x = inputs[0]
        if isinstance(layer, nn.Embedding) and x.dim() > 0 and x.shape[0] == 1 and self._batch_size != 1:
            if self._batch_size is None:
                raise UnsupportedParameterError(
                    f"layer '{name}' got ids of shape {tuple(x.shape)} broadcast over a batch whose size cannot be "
                    "read from the model's arguments (no tensor among them); call the model with its batch "
                    "tensors as arguments, e.g. model(input_ids=ids), or pass per-example ids (B, T)")
            # Ids broadcast over the batch (GPT-2's and BERT's default position_ids): look them up
            # per example so each example's gradient stays its own; the probes check that the model
            # broadcasts the output over the batch rather than indexing it.
            x = x.expand(self._batch_size, *x.shape[1:])
            output = F.embedding(x, layer.weight, layer.padding_idx)
        if self._capture is not None:
            self._capture.append((name, x.detach()))
            return output
        self._uses.append(_Use(layer, name, x, output, x._version, output._version))
        return output

    def _check_graph(self, loss, uses):
        """Fail if a trainable parameter reaches the loss other than through a hooked layer."""
        skip = {}
        for use in uses:
            upstream = [use.inputs.grad_fn] if use.inputs.grad_fn is not None else []
            skip.setdefault(use.output.grad_fn, []).extend(upstream)
        stack, seen = [loss.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in skip:
                stack.extend(skip[node])
                continue
            param = getattr(node, "variable", None)
            if param is not None and param in self._param_names:
                raise UnsupportedParameterError(
                    f"trainable parameter '{self._param_names[param]}' reaches the loss outside a supported "
                    "layer's forward (used directly, e.g. F.linear(x, module.weight)); its per-example "
                    "gradient cannot be clipped")
            stack.extend(next_node for next_node, _ in node.next_functions)

    def _check_batch_axis(self, uses, batch):
        for use in uses:
            min_dims = 1 if isinstance(use.layer, nn.Embedding) else 2
            for what, tensor in (("input", use.inputs), ("output", use.output)):
                if tensor.dim() < min_dims or tensor.shape[0] != batch:
                    raise ExampleMixingError(
                        f"layer '{use.name}' got an {what} of shape {tuple(tensor.shape)} whose first axis is not "
                        f"the batch ({batch} per-example losses), so its trainable parameters have no per-example "
                        "gradients")

    def _gradient_probe(self, losses, uses, output_grads):
        """Refuse a layer whose output rows receive gradient from other examples' losses (module docstring)."""
        generator = torch.Generator().manual_seed(len(uses))
        signs = (torch.randint(0, 2, (losses.shape[0],), generator=generator) * 2 - 1).to(losses.device, losses.dtype)
        probed = torch.autograd.grad(losses, [use.output for use in uses], grad_outputs=signs, allow_unused=True)
        for use, plain, signed in zip(uses, output_grads, probed):
            if plain is None or signed is None:
                continue
            plain, signed = _f32(plain).flatten(1), _f32(signed).flatten(1)
            leak = (signed - signs.float()[:, None] * plain).norm(dim=1)
            scale = plain.norm(dim=1).max().clamp_min(1e-30)
            if (leak > 1e-4 * scale).any():
                raise ExampleMixingError(
                    f"layer '{use.name}': the gradient at its output row of example {int(leak.argmax())} comes from "
                    "other examples' losses too, so its rows are not one example each (an input looked up or "
                    "computed without the batch axis, e.g. embedding(arange(T)) when T equals the batch size; an "
                    "output indexed or shared across the batch; or examples coupled after this layer); its "
                    "per-example gradients cannot be clipped")

    def _input_probe(self, uses, batch):
        """Refuse a layer whose input rows change when only another example's model inputs change."""
        if self._call is None:
            raise UnsupportedParameterError("the layers ran without a call of the model the engine is attached to; "
                                            "call that model (not one of its parts) in the forward pass")
        args, kwargs = self._call
        generator = torch.Generator().manual_seed(batch)
        changed = batch - 1

        def perturb(tensor):
            return _perturb_example(tensor, batch, changed, generator)
        captured = []
        for call_args, call_kwargs in ((args, kwargs), (_map_tensors(args, perturb), _map_tensors(kwargs, perturb))):
            self._capture = []
            try:
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.manual_seed(0)  # the same dropout masks in both passes
                    self.model(*call_args, **call_kwargs)
                captured.append(self._capture)
            finally:
                self._capture = None
        others = torch.arange(batch) != changed
        for (name, before), (name_after, after) in zip(*captured):
            if name != name_after or before.shape != after.shape or before.dim() == 0 or before.shape[0] != batch:
                continue
            before, after = _f32(before)[others], _f32(after)[others]
            if not torch.allclose(before, after, rtol=1e-4, atol=1e-6 * before.abs().max().clamp_min(1.0).item()):
                raise ExampleMixingError(
                    f"layer '{name}': its input for other examples changed when only example {changed}'s model inputs "
                    "changed, so the model couples examples before this layer (e.g. normalisation over the batch); "
                    "its per-example gradients cannot be clipped")

    def backward(self, losses: torch.Tensor) -> torch.Tensor:
        """Accumulate the clipped sum into `.grad`; return the unclipped per-example norms (B,).

        `losses`: the per-example losses of the last forward, shape (B,)."""
        uses, self._uses = self._uses, []
        if losses.dim() != 1:
            raise ValueError(f"backward() takes the per-example losses, shape (batch,), got shape {tuple(losses.shape)}"
                             "; pass the vector of losses, not their sum or mean")
        if not uses:
            raise RuntimeError("no forward pass with gradients was recorded before backward()")
        for use in uses:
            if use.inputs._version != use.input_version or use.output._version != use.output_version:
                raise RuntimeError(f"the input or output of layer '{use.name}' was modified in place after "
                                   "its forward; per-example gradients would be wrong")
        batch = losses.shape[0]
        _refuse_non_finite("loss", losses)
        self._check_batch_axis(uses, batch)
        loss = losses.sum()
        if not self._graph_checked:
            self._check_graph(loss, uses)
            self._graph_checked = True
        pattern = _use_pattern(uses, batch)
        probe = batch > 1 and pattern not in self._probed_patterns
        output_grads = torch.autograd.grad(loss, [use.output for use in uses], allow_unused=True, retain_graph=probe)
        if probe:
            self._gradient_probe(losses, uses, output_grads)
            self._input_probe(uses, batch)
            self._probed_patterns.add(pattern)
        self._call = None

        factors = {}
        for use, output_grad in zip(uses, output_grads):
            if output_grad is None:
                continue
            rule, _ = RULES[type(use.layer)]
            feature_dims = _feature_dims(use.layer)
            x = _flatten_sequence(use.inputs, feature_dims)
            g = _flatten_sequence(output_grad, 1 if isinstance(use.layer, nn.Embedding) else feature_dims)
            for param, factor in rule(use.layer, x, g).items():
                if param.requires_grad:
                    factors.setdefault(param, []).append(factor)
        if not factors:
            raise RuntimeError("the loss does not depend on any trainable parameter")
        _plan_linear_factors(factors, self.materialise_budget * _bytes_in_play(uses, output_grads, factors))
        del uses, output_grads

        accumulate_dtype = torch.float64 if loss.dtype == torch.float64 else torch.float32
        sq_norms = loss.new_zeros(batch, dtype=accumulate_dtype)
        gram = _GramCache()
        for uses_of_param in factors.values():
            for i, factor in enumerate(uses_of_param):
                sq_norms += _sq_norm(factor, gram)
                for other in uses_of_param[i + 1:]:
                    sq_norms += 2 * _inner(factor, other)
        del gram
        norms = sq_norms.clamp_min(0).sqrt()
        _refuse_non_finite("gradient norm", norms)
        clip_factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

        for param, uses_of_param in factors.items():
            clipped_sum = uses_of_param[0].weighted_sum(clip_factors)
            for factor in uses_of_param[1:]:
                clipped_sum += factor.weighted_sum(clip_factors)
            clipped_sum = clipped_sum.to(param.dtype)
            param.grad = clipped_sum if param.grad is None else param.grad + clipped_sum
        return norms

    def detach(self):
        """Remove the hooks; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._uses = []
        self._call = None

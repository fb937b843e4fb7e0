"""`PerExampleGradients`: hooks a model so that `backward(losses)` writes the flat-clipped sum of its
per-example gradients (the package docstring says how; docs/engine.md the maths)."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.autograd.profiler import record_function

from common.dp.per_example_grads.errors import ExampleMixingError, NonFiniteGradientError, UnsupportedParameterError
from common.dp.per_example_grads.factors import GramCache, UnitLayout, inner, per_unit, plan_linear_factors, sq_norm
from common.dp.per_example_grads.probes import (
    batch_size_of,
    check_batch_axis,
    gradient_probe,
    input_probe,
    sequence_length_of,
    use_pattern,
)
from common.dp.per_example_grads.rules import RULES, LayerRule, rule_for, rule_name

# Modules whose forward in train mode couples the examples of a batch (batch statistics).
BATCH_COUPLING_MODULES = (nn.modules.batchnorm._BatchNorm,)


def _flatten_sequence(tensor, feature_dims):
    """(B, ..., *features) -> (B, T, prod(features)); T = 1 for 2-D inputs."""
    batch = tensor.shape[0]
    if feature_dims == 0:
        return tensor.reshape(batch, -1)
    return tensor.reshape(batch, -1, *tensor.shape[tensor.dim() - feature_dims:]).flatten(2)


@dataclass
class _Use:
    layer: nn.Module
    rule: LayerRule
    name: str
    inputs: torch.Tensor
    output: torch.Tensor
    input_version: int
    output_version: int


def _same(expected, output):
    return expected.shape == output.shape and bool(torch.equal(expected, output))


def _refuse_non_finite(quantity, values):
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        raise NonFiniteGradientError(quantity, (~finite).nonzero().flatten().tolist())


def _bytes_in_play(uses, output_grads, factors):
    """Memory a step holds anyway: stored layer inputs and outputs, their gradients, and four copies of the
    trainable parameters (weights, gradients, two optimiser moments)."""
    tensors = {}
    for tensor in [t for use in uses for t in (use.inputs, use.output)] + [g for g in output_grads if g is not None]:
        tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(tensors.values()) + 4 * sum(p.numel() * p.element_size() for p in factors)


class PerExampleGradients:
    """Hooks a model so that `backward(losses)` writes the flat-clipped sum of per-example gradients.

    `losses` are the per-example losses, shape (B,) (not their sum or mean), so that example
    i's gradient is the gradient of its own loss. After `backward`, each trainable parameter's
    `.grad` holds (accumulates) sum_i c_i g_i with c_i = min(1, max_grad_norm / ||g_i||),
    the norm taken over all trainable parameters together; no noise is added here.

    `per_example_safe`: modules (or their names) that the engine would refuse as coupling
    examples (BatchNorm in train mode) but that the caller knows to be per-example here.
    `materialise_budget`: the memory for per-example gradients kept materialised to save time,
    as a fraction of what the step holds anyway (see `factors.plan_linear_factors`).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, per_example_safe=(), materialise_budget=0.5):
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
        self._probed_patterns = set()
        self._sequence_length = None
        self._flattened_steps = 0
        self._handles = [model.register_forward_pre_hook(self._start_forward, with_kwargs=True)]
        for layer, name in self._hooked.items():
            self._handles.append(layer.register_forward_hook(self._store_use, with_kwargs=True))
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
                if param.dtype not in (torch.float32, torch.float64):
                    # a clipped sum rounded to half precision, and accumulated in it, can move by more than C
                    raise UnsupportedParameterError(
                        f"trainable parameter '{name}' is {param.dtype}; keep trainable parameters in float32 (or "
                        "float64) and compute in half precision under autocast (--mixed_precision bf16)")
        owners, covered = [], set()
        for layer_name, layer in self.model.named_modules(remove_duplicate=False):
            trainable = [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
            if trainable:
                rule = rule_for(layer)
                owners.append((layer_name, layer, rule, trainable))
                covered.update(p for n, p in trainable if rule is not None and n in rule.parameters)
        for layer_name, layer, rule, trainable in owners:
            for local_name, param in trainable:
                # a tensor that another layer's rule covers is that layer's (BERT's MLM head `bias` is its decoder's);
                # a use outside that layer still stops the first backward (_check_graph)
                if param not in covered:
                    full_name = f"{layer_name}.{local_name}" if layer_name else local_name
                    raise UnsupportedParameterError(
                        f"trainable parameter '{full_name}' belongs to {type(layer).__name__}, which has no "
                        f"exact per-example gradient rule (supported: {', '.join(rule_name(key) for key in RULES)}); "
                        "freeze it (requires_grad=False), replace the layer, or register a rule (docs/engine.md)")
            if rule is None:
                continue
            reason = rule.check(layer) if rule.check is not None else None
            if reason:
                raise UnsupportedParameterError(f"trainable parameter(s) of '{layer_name}': {reason}")
            self._hooked[layer] = (layer_name, rule)

    def _start_forward(self, module, args, kwargs):
        if torch.is_grad_enabled() and self._capture is None:
            self._uses = []
            self._call = (args, kwargs)
        self._batch_size = batch_size_of(args, kwargs)
        self._sequence_length = sequence_length_of(args, kwargs)

    def _store_use(self, layer, args, kwargs, output):
        if not torch.is_grad_enabled() and self._capture is None:
            return None
        name, rule = self._hooked[layer]
        x = args[0] if rule.ids is None else rule.ids(layer, args, kwargs)
        if rule.ids is not None and not _same(rule.lookup(layer, x), output):
            raise UnsupportedParameterError(
                f"layer '{name}' ({type(layer).__name__}): the ids its rule reads from the call's arguments do not "
                "give the layer's output (the library's forward changed?); freeze it or update its rule")
        if rule.lookup is not None and x.dim() > 0 and x.shape[0] == 1 and self._batch_size != 1:
            if self._batch_size is None:
                raise UnsupportedParameterError(
                    f"layer '{name}' got ids of shape {tuple(x.shape)} broadcast over a batch whose size cannot be "
                    "read from the model's arguments (no tensor among them); call the model with its batch "
                    "tensors as arguments, e.g. model(input_ids=ids), or pass per-example ids (B, T)")
            # Ids broadcast over the batch (GPT-2's and BERT's default position_ids): look them up
            # per example so each example's gradient stays its own; the probes check that the model
            # broadcasts the output over the batch rather than indexing it.
            x = x.expand(self._batch_size, *x.shape[1:])
            output = rule.lookup(layer, x)
        if self._capture is not None:
            self._capture.append((name, x.detach()))
            return output
        self._uses.append(_Use(layer, rule, name, x, output, x._version, output._version))
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

    def _check_flattened_rows(self, flattened, batch):
        """Rows flattened to (N, ...) with N != B are taken as (B, N / B, ...) only where N is the batch's B x T (T
        the model call's sequence length): every token of every example, as a reshape of (B, T, ...) lays them out.
        Fewer rows are a selection (only the real tokens, say), whose grouping by example depends on the data."""
        for use in flattened:
            if self._sequence_length is None or use.inputs.shape[0] != batch * self._sequence_length:
                raise ExampleMixingError(
                    f"layer '{use.name}' got {use.inputs.shape[0]} rows for {batch} examples of "
                    f"{self._sequence_length} positions: rows flattened across the batch are accepted only as every "
                    "position of every example (B x T rows), since which rows are an example's cannot be proved "
                    "for a selection of them; apply the layer before selecting rows, or freeze it")

    def _capture_inputs(self, args, kwargs):
        """(layer name, input) of every hooked layer call of the model on (args, kwargs), without gradients and
        with the same random state on every call (the same dropout masks)."""
        self._capture = []
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(0)
                self.model(*args, **kwargs)
            return self._capture
        finally:
            self._capture = None

    def backward(self, losses: torch.Tensor, units: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Accumulate the clipped sum into `.grad`; return the unclipped per-example norms (B,).

        `losses`: the per-example losses of the last forward, shape (B,). `units` (B,), if given, labels each
        example with its privacy unit (a sender): the engine then clips each unit's gradient, the sum of its
        examples' gradients, as one (sum_u min(1, C / ||sum_{i in u} g_i||) sum_{i in u} g_i) and returns the
        unclipped norms per unit, in the order of their labels."""
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
        output_grads = self._output_grads(losses, uses)
        factors, batch = self._factors(uses, output_grads, batch, units)
        del uses, output_grads
        norms, clip_factors = self._clip_factors(factors, batch, losses)
        self._add_clipped_sums(factors, clip_factors)
        return norms

    @record_function("per_example_grads: output gradients")
    def _output_grads(self, losses, uses):
        """The gradient of the summed loss at every stored layer output, after the checks (and the probes, on a
        step with a new pattern of layer uses)."""
        batch = losses.shape[0]
        _refuse_non_finite("loss", losses)
        check_batch_axis(uses, batch)
        loss = losses.sum()
        # every step: a parameter used outside its layer only on some inputs must still stop the run
        self._check_graph(loss, uses)
        pattern = use_pattern(uses, batch)
        flattened = [use for use in uses if use.inputs.shape[0] != batch]
        self._check_flattened_rows(flattened, batch)
        # rows flattened to (B * T, ...) may be ordered differently on a step of the same shapes: their gradient
        # probe runs on every step, with fresh signs
        probe = batch > 1 and (bool(flattened) or pattern not in self._probed_patterns)
        output_grads = torch.autograd.grad(loss, [use.output for use in uses], allow_unused=True, retain_graph=probe)
        if probe:
            self._flattened_steps += bool(flattened)
            gradient_probe(losses, uses, output_grads, seed=len(uses) + 7919 * self._flattened_steps)
        if probe and pattern not in self._probed_patterns:
            if self._call is None:
                raise UnsupportedParameterError("the layers ran without a call of the model the engine is attached "
                                                "to; call that model (not one of its parts) in the forward pass")
            input_probe(self._capture_inputs, self._call, batch)
            self._probed_patterns.add(pattern)
        self._call = None
        return output_grads

    @record_function("per_example_grads: factors")
    def _factors(self, uses, output_grads, batch, units):
        """Each trainable parameter's per-example (or per-unit) gradient factors, planned; and the number of rows
        (examples or units) they have."""
        factors = {}
        for use, output_grad in zip(uses, output_grads):
            if output_grad is None:
                continue
            # rows flattened to (B * k, ...) (OPT's feed-forward) are (B, k, ...): the probes proved the order
            x = _flatten_sequence(use.inputs.unflatten(0, (batch, -1)), use.rule.input_feature_dims(use.layer))
            g = _flatten_sequence(output_grad.unflatten(0, (batch, -1)), use.rule.output_feature_dims(use.layer))
            for param, factor in use.rule.factors(use.layer, x, g).items():
                if param.requires_grad:
                    factors.setdefault(param, []).append(factor)
        if not factors:
            raise RuntimeError("the loss does not depend on any trainable parameter")
        if units is not None:
            if units.shape != (batch,):
                raise ValueError(f"units: one label per example expected, shape ({batch},), got {tuple(units.shape)}")
            layout = UnitLayout.of(units.detach().cpu())
            factors = {param: [per_unit(f, layout) for f in uses_of_param] for param, uses_of_param in factors.items()}
            batch = layout.num_units
        plan_linear_factors(factors, self.materialise_budget * _bytes_in_play(uses, output_grads, factors))
        return factors, batch

    @record_function("per_example_grads: norms")
    def _clip_factors(self, factors, batch, losses):
        """The unclipped norms (tied uses' cross terms included) and the clip factors min(1, C / norm)."""
        accumulate_dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
        sq_norms = losses.new_zeros(batch, dtype=accumulate_dtype)
        gram = GramCache()
        for uses_of_param in factors.values():
            for i, factor in enumerate(uses_of_param):
                sq_norms += sq_norm(factor, gram)
                for other in uses_of_param[i + 1:]:
                    sq_norms += 2 * inner(factor, other)
        del gram
        # before the clamp: a cross term of a parameter used twice can overflow to -inf, which the clamp would hide
        _refuse_non_finite("gradient norm", sq_norms)
        norms = sq_norms.clamp_min(0).sqrt()
        # exactly min(1, C / ||g_i||); a zero norm (no gradient) keeps the factor 1
        return norms, (self.max_grad_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp(max=1.0)

    @record_function("per_example_grads: clipped sums")
    def _add_clipped_sums(self, factors, clip_factors):
        for param, uses_of_param in factors.items():
            clipped_sum = uses_of_param[0].weighted_sum(clip_factors)
            for factor in uses_of_param[1:]:
                clipped_sum += factor.weighted_sum(clip_factors)
            clipped_sum = clipped_sum.to(param.dtype)
            param.grad = clipped_sum if param.grad is None else param.grad + clipped_sum

    def detach(self) -> None:
        """Remove the hooks; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._uses = []
        self._call = None

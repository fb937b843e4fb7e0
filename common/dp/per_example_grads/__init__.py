"""Exact per-example gradient clipping for stock PyTorch and Hugging Face models (docs/engine.md).

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
a trainable parameter in half precision (at attach), a trainable parameter reaching
the loss outside a supported layer (at any backward), a module that couples examples
in its forward (BatchNorm in train mode, at its forward), and a layer whose stored
rows are not one example each (probes.py).

The package, by concern: `factors` (the factor algebra), `rules` (the public registry: one
`@register_rule` function per layer type), `probes` (the proof of the batch axis), `engine`
(`PerExampleGradients`), `errors`.
"""

from common.dp.per_example_grads.engine import BATCH_COUPLING_MODULES, PerExampleGradients
from common.dp.per_example_grads.errors import ExampleMixingError, NonFiniteGradientError, UnsupportedParameterError
from common.dp.per_example_grads.factors import Dense, Outer, Rows
from common.dp.per_example_grads.rules import RULES, LayerRule, register_rule, rule_for

__all__ = ["PerExampleGradients", "register_rule", "rule_for", "LayerRule", "RULES", "Outer", "Rows", "Dense",
           "UnsupportedParameterError", "ExampleMixingError", "NonFiniteGradientError", "BATCH_COUPLING_MODULES"]

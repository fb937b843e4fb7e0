"""The factor algebra: a per-example gradient of one use of a parameter, held without materialising it
(Outer, Rows, Dense: the package docstring), with per example its squared norm (`sq_norm`), its inner product
with another use of the same parameter (`inner`: the cross terms of tied weights) and the clipped sum over
the batch (`weighted_sum`). The maths: docs/engine.md."""

from dataclasses import dataclass

import torch

# Per-example gradients materialised only for their norm are built this many elements at a time.
MATERIALISE_CHUNK_ELEMENTS = 2 ** 22
# The time of one pass (a write or a read) over an element of a materialised gradient, in flops of a GEMM: memory
# bandwidth against GEMM throughput, measured on CPU (about 30 GB/s against 160 GFLOP/s; docs/engine.md).
FLOPS_PER_ELEMENT_PASS = 21
# Gradients are kept materialised only up to this many bytes per layer: above 32 MiB, glibc's allocator maps fresh
# pages for every tensor, and faulting them in made a kept gradient slower than the GEMM it saves (docs/engine.md).
MAX_KEPT_BYTES = 32 * 2 ** 20


def f32(tensor):
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


@dataclass
class Outer:
    """G_i = left_i^T right_i with left (B, T, R) and right (B, T, K): a linear layer's weight."""

    left: torch.Tensor
    right: torch.Tensor
    norm_by_materialising: bool = False  # chosen by plan_linear_factors

    def costs(self):
        """Per example, in flops (memory passes as FLOPS_PER_ELEMENT_PASS each): the ghost norm, the norm by
        materialising (written, read once), the GEMM of the clipped sum over the sequence, a gradient kept
        materialised (written, read for its norm and for the clipped sum), and the bytes it holds."""
        _, seq_len, left_width = self.left.shape
        elements = left_width * self.right.shape[2]
        product = 2 * seq_len * elements
        return (2 * seq_len * seq_len * (left_width + self.right.shape[2]),
                product + 2 * FLOPS_PER_ELEMENT_PASS * elements, product,
                product + 3 * FLOPS_PER_ELEMENT_PASS * elements, 4 * elements)

    def materialise(self):
        return Dense(torch.bmm(f32(self.left).transpose(1, 2), f32(self.right)))

    def sq_norm_by_materialising(self):
        """Squared norms from per-example gradients materialised a slice of the wider side at a time."""
        left, right = f32(self.left), f32(self.right)
        if left.shape[2] < right.shape[2]:
            left, right = right, left
        batch, _, width = left.shape
        step = max(1, MATERIALISE_CHUNK_ELEMENTS // (batch * right.shape[2]))
        total = None
        for start in range(0, width, step):
            block = torch.bmm(left[:, :, start:start + step].transpose(1, 2), right)
            part = _sq_norms(block)
            total = part if total is None else total + part
        return total

    def weighted_sum(self, weights):
        # Scale the narrower side: for an LM head left is B x T x vocab.
        left, right = f32(self.left), f32(self.right)
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
        scaled = f32(self.values) * weights[:, None, None]
        out = scaled.new_zeros(self.num_rows, scaled.shape[2])
        return out.index_add_(0, self.ids.flatten(), scaled.flatten(0, 1))


@dataclass
class Dense:
    """Materialised per-example gradients, values (B, *parameter shape)."""

    values: torch.Tensor

    def weighted_sum(self, weights):
        return torch.einsum("b,b...->...", weights, f32(self.values))


class GramCache:
    """Per-example Gram matrices x_i x_i^T, reused by consecutive layers reading the same
    tensor (BERT's query, key and value); only the newest few are kept, to bound memory."""

    def __init__(self, size=2):
        self._grams = {}
        self._size = size

    def __call__(self, tensor):
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in self._grams:
            x = f32(tensor)
            self._grams[key] = torch.bmm(x, x.transpose(1, 2))
            if len(self._grams) > self._size:
                del self._grams[next(iter(self._grams))]
        return self._grams[key]


@dataclass
class UnitLayout:
    """Where each unit's examples sit in a batch: `index` (U * width,) lists each unit's example positions, padded
    with `batch` (a row of zeros) up to `width`, the most examples of one unit; `unit_of` (B,) is each example's
    unit. `contiguous`: every unit holds `width` consecutive examples in order, so grouping is a reshape."""

    index: torch.Tensor
    unit_of: torch.Tensor
    num_units: int
    width: int
    batch: int
    contiguous: bool

    @classmethod
    def of(cls, units: torch.Tensor) -> "UnitLayout":
        """The layout of `units` (B,): one label per example; units are numbered in the order of their labels."""
        labels, unit_of = torch.unique(units, return_inverse=True)
        batch, num_units = units.shape[0], labels.shape[0]
        counts = torch.bincount(unit_of, minlength=num_units)
        width = int(counts.max())
        order = unit_of.argsort(stable=True)
        starts = counts.cumsum(0) - counts
        position = torch.arange(batch) - starts[unit_of[order]]
        index = torch.full((num_units * width,), batch, dtype=torch.long)
        index[unit_of[order] * width + position] = order
        contiguous = bool((counts == width).all()) and bool((order == torch.arange(batch)).all())
        return cls(index, unit_of, num_units, width, batch, contiguous)

    def concatenate(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (U, width * T, ...): each unit's examples one after the other along the sequence axis
        (zeros where a unit has fewer than `width`)."""
        if not self.contiguous:
            padded = torch.cat([tensor, tensor.new_zeros(1, *tensor.shape[1:])])
            tensor = padded[self.index.to(tensor.device)]
        return tensor.reshape(self.num_units, self.width * tensor.shape[1], *tensor.shape[2:])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (U, ...): the sum over each unit's examples."""
        out = f32(tensor).new_zeros(self.num_units, *tensor.shape[1:])
        return out.index_add_(0, self.unit_of.to(tensor.device), f32(tensor))


def per_unit(factor, layout: UnitLayout):
    """The factor of each unit's gradient, the sum of its examples' gradients: linear and embedding factors
    concatenate the unit's sequences (sum_i A_i^T B_i = [A_1; ...; A_k]^T [B_1; ...; B_k]), so the ghost norm of
    the result includes the cross terms between a unit's examples; dense factors are summed."""
    if isinstance(factor, Outer):
        return Outer(layout.concatenate(factor.left), layout.concatenate(factor.right))
    if isinstance(factor, Rows):
        # padding rows: id 0 with zero values, which adds nothing
        return Rows(layout.concatenate(factor.ids), layout.concatenate(factor.values), factor.num_rows)
    return Dense(layout.sum(factor.values))


def sq_norm(factor, gram):
    """Per-example squared Frobenius norm of one factor, shape (B,)."""
    if isinstance(factor, Outer):
        if factor.norm_by_materialising:
            return factor.sq_norm_by_materialising()
        return _batched_dot(gram(factor.left), gram(factor.right))
    if isinstance(factor, Rows):
        same_row = factor.ids[:, :, None] == factor.ids[:, None, :]
        return _batched_dot(gram(factor.values), same_row)
    return _sq_norms(f32(factor.values))


def plan_linear_factors(factors, budget_bytes):
    """Choose, per linear-layer factor, how its norm and clipped sum are computed, by estimated cost.

    Per example with sequence length T, widths R and K, the ghost norm costs 2 T^2 (R + K) flops
    and materialising the gradient 2 T R K plus a write and a read of its R K elements; either way
    the clipped sum is then one GEMM over the sequence (2 T R K). A gradient kept materialised needs
    no GEMM for the clipped sum (one more read instead) but holds 4 R K bytes until the end of the
    step. So every factor takes the cheaper norm, and factors are kept materialised where that
    needs no more memory than their Gram matrices, then by time saved per byte while the kept
    bytes fit `budget_bytes` (and each at most MAX_KEPT_BYTES). Counting the memory passes
    matters at short sequences: at T = 64 a kept gradient is slower than its Gram matrices and
    GEMM (docs/engine.md).
    """
    ranked = []
    for uses_of_param in factors.values():
        for index, factor in enumerate(uses_of_param):
            if not isinstance(factor, Outer):
                continue
            ghost, materialising, product, kept, nbytes = factor.costs()
            factor.norm_by_materialising = materialising < ghost
            batch, seq_len = factor.left.shape[:2]
            if nbytes <= 8 * seq_len * seq_len:  # no larger than the two Gram matrices
                uses_of_param[index] = factor.materialise()
                continue
            saving = min(ghost, materialising) + product - kept
            if saving > 0 and batch * nbytes <= MAX_KEPT_BYTES:
                ranked.append((saving / nbytes, batch * nbytes, uses_of_param, index))
    ranked.sort(key=lambda candidate: -candidate[0])
    for _, nbytes, uses_of_param, index in ranked:
        if nbytes <= budget_bytes:
            uses_of_param[index] = uses_of_param[index].materialise()
            budget_bytes -= nbytes


def _rows(x):
    """(B, ...) -> (B, rows, -1): the second axis as rows, the rest flattened."""
    return x.reshape(x.shape[0], x.shape[1] if x.dim() > 2 else 1, -1)


def _batched_dot(x, y):
    """sum over all but the first axis of x * y, each row's sum added in float64: a float32 sum of millions of
    products drops the small ones (_sq_norms)."""
    return (_rows(x) * _rows(y)).sum(2).sum(1, dtype=torch.float64)


def _sq_norms(x):
    """sum over all but the first axis of x * x: the squared norm of each row (one norm reduction, several times
    faster than a batched dot product), the rows added in float64, since a float32 sum of millions of squares drops
    the small ones (a norm 4e-5 too small for a 768 x 3072 gradient)."""
    return torch.linalg.vector_norm(_rows(x), dim=2).square().sum(1, dtype=torch.float64)


def _gather_rows(table, ids):
    """table (B, S, R), ids (B, T) -> table[b, s, ids[b, t]] as (B, S, T)."""
    return torch.gather(table, 2, ids[:, None, :].expand(-1, table.shape[1], -1))


def _inner_outer_outer(f, h):
    left = torch.bmm(f32(f.left), f32(h.left).transpose(1, 2))
    right = torch.bmm(f32(f.right), f32(h.right).transpose(1, 2))
    return _batched_dot(left, right)


def _inner_outer_rows(f, h):
    # <left^T right, rows> = sum_{s,t} left[s, id_t] (right_s . values_t)
    picked = _gather_rows(f32(f.left), h.ids)
    return _batched_dot(picked, torch.bmm(f32(f.right), f32(h.values).transpose(1, 2)))


def _inner_outer_dense(f, h):
    return torch.einsum("brk,btr,btk->b", f32(h.values), f32(f.left), f32(f.right))


def _inner_rows_rows(f, h):
    same_row = f.ids[:, :, None] == h.ids[:, None, :]
    return _batched_dot(torch.bmm(f32(f.values), f32(h.values).transpose(1, 2)), same_row)


def _inner_rows_dense(f, h):
    picked = torch.gather(f32(h.values), 1, f.ids[:, :, None].expand(-1, -1, h.values.shape[2]))
    return _batched_dot(picked, f32(f.values))


def _inner_dense_dense(f, h):
    return _batched_dot(f32(f.values), f32(h.values))


_INNER = {
    (Outer, Outer): _inner_outer_outer,
    (Outer, Rows): _inner_outer_rows,
    (Outer, Dense): _inner_outer_dense,
    (Rows, Rows): _inner_rows_rows,
    (Rows, Dense): _inner_rows_dense,
    (Dense, Dense): _inner_dense_dense,
}


def inner(f, h):
    """Per-example inner product <G_f,i, G_h,i> of two uses of one parameter, shape (B,)."""
    if (type(f), type(h)) in _INNER:
        return _INNER[type(f), type(h)](f, h)
    return _INNER[type(h), type(f)](h, f)

"""The DP training loop shared by the private stages (stage 3's domain classifier, stage 6's fine-tuning).

Each logical step draws its examples (Poisson sampling with q = expected logical batch / n, or a fixed-size
shuffled batch), lets the per-example engine accumulate their flat-clipped sum in micro-batches, sums it over
processes, adds Gaussian noise of std noise_multiplier x clip once, divides by the expected batch and steps a
stock torch optimiser. The model trains in eval mode (no dropout: public randomness tied to batch positions
would let one example move the others' gradients); the sampling and noise seeds are secret and live only in the
private training state beside the release (`<output_dir>.private/`), never in it. What is released, the
adjacency each epsilon is for, resumption and `--deterministic_dp`: docs/privacy.md.
"""

import argparse
import hashlib
import json
import math
import os
import secrets
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from common.atomic_io import atomic_directory, write_json
from common.dp import ledger
from common.dp.accounting import Mechanism, calibrate_noise_multiplier, compute_epsilons, default_delta
from common.dp.audit import GradientCanaries
from common.dp.per_example_grads import NonFiniteGradientError, PerExampleGradients
from common.stage import NOT_SETTINGS, DataError, fingerprint, resolve_checkpoint

STATE_FILE = "training_state.pt"
# How the logical batch is cut into micro-batches and spread over processes: not part of the mechanism
MICRO_BATCHING = frozenset({"per_device_train_batch_size", "gradient_accumulation_steps"})
PRIVATE_SUFFIX = ".private"
FEW_STEPS = 20  # fewer noisy steps than this: the run says how to get more (small private sets)
ADJACENCY = {"poisson": "add or remove one private {unit}",
             "shuffle": "zero-out: one private {unit} replaced by one that contributes nothing (the shuffle "
                        "sampling's accounting, one Gaussian per epoch at sensitivity C)"}
PRIVACY_UNITS = ("example", "sender")
UNIT_ADJACENCY = {"example": "example", "sender": "sender (all of their examples)"}
AUDIT_NAME = "audit.json"
SECRET_RANDOMNESS = "secret: seeds drawn from the operating system's entropy, kept only in the private training state"


def add_dp_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The DP loop's flags (a stage adds its own inputs and --output_dir)."""
    group = parser.add_argument_group("DP training")
    group.add_argument("--noise_multiplier", type=float, default=None,
                       help="Gaussian noise std / clip norm; or give --target_epsilon")
    group.add_argument("--target_epsilon", type=float, default=None,
                       help="calibrate the noise multiplier to this epsilon (PRV) for the planned steps")
    group.add_argument("--target_epsilon_scope", choices=("stage", "run"), default="stage",
                       help="run: --target_epsilon bounds this stage composed with the other stages already in "
                            "the run's privacy ledger")
    group.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="clip norm C of each example's gradient (of each sender's, with --privacy_unit sender)")
    group.add_argument("--privacy_unit", choices=PRIVACY_UNITS, default="example",
                       help="what epsilon protects: one example, or one sender with all of their examples (Poisson "
                            "sampling of senders, each contributing one clipped gradient; batch sizes and n then "
                            "count senders): docs/privacy.md")
    group.add_argument("--max_examples_per_unit", type=int, default=8,
                       help="--privacy_unit sender: a sampled sender contributes at most this many of their "
                            "examples per step (drawn with the secret generator)")
    group.add_argument("--delta", type=float, default=None,
                       help="default 1 / (10 n) for n private examples (senders, with --privacy_unit sender)")
    group.add_argument("--sampling", choices=("poisson", "shuffle"), default="poisson")
    group.add_argument("--per_device_train_batch_size", type=int, default=32)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=1e-3)
    group.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw")
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument("--lr_scheduler_type", choices=("constant", "linear"), default="constant")
    group.add_argument("--num_warmup_steps", type=int, default=0)
    group.add_argument("--num_train_epochs", type=float, default=3)
    group.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    group.add_argument("--checkpointing_steps", type=int, default=None, help="also checkpoint every N steps")
    group.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint-N directory of the private training state, or 'latest' (the newest in "
                            "<output_dir>.private, if there is one)")
    group.add_argument("--keep_training_state", action="store_true",
                       help="keep the private training state after the release; it holds the DP randomness, so "
                            "whoever holds it can undo the guarantee: never share it")
    group.add_argument("--deterministic_dp", action="store_true",
                       help="derive the sampling and noise seeds from --seed, the stage, the mechanism, the settings "
                            "and the inputs (debugging, exact reproduction); the guarantee then assumes that --seed "
                            "is secret (and not a small number)")
    group.add_argument("--mixed_precision", choices=("no", "bf16"), default="no")
    group.add_argument("--run_dir", default=None,
                       help="directory of the run's privacy ledger (default: the parent of --output_dir)")
    group.add_argument("--audit_canaries", type=int, default=0,
                       help="audit the run with this many white-box canaries (each in with probability 1/2): "
                            "audit.json beside privacy.json gives an empirical lower bound on epsilon "
                            "(docs/privacy.md)")
    group.add_argument("--seed", type=int, default=0,
                       help="initialisation, data splits and order of public data; not the DP randomness unless "
                            "--deterministic_dp")
    return parser


@dataclass
class DPConfig:
    """The DP loop's settings, as `add_dp_arguments` parses them (its flags' help says what each is, and holds the
    defaults). `stage_settings`: every setting of the stage, what --deterministic_dp derives its seeds from."""

    output_dir: str
    noise_multiplier: Optional[float]
    target_epsilon: Optional[float]
    target_epsilon_scope: str
    max_grad_norm: float
    privacy_unit: str
    max_examples_per_unit: int
    delta: Optional[float]
    sampling: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    lr_scheduler_type: str
    num_warmup_steps: int
    num_train_epochs: float
    max_train_steps: Optional[int]
    checkpointing_steps: Optional[int]
    resume_from_checkpoint: Optional[str]
    keep_training_state: bool
    deterministic_dp: bool
    mixed_precision: str
    run_dir: Optional[str]
    seed: int
    audit_canaries: int
    stage_settings: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DPConfig":
        """The DP settings of a stage's parsed arguments (a parser that `add_dp_arguments` extended)."""
        names = [f.name for f in fields(cls) if f.name != "stage_settings"]
        return cls(**{name: getattr(args, name) for name in names}, stage_settings=dict(vars(args)))


def sequence_classification_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-example cross-entropy of a sequence classifier; batch holds `labels` and the model inputs."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return F.cross_entropy(model(**inputs).logits.float(), batch["labels"], reduction="none")


def ledger_dir(settings) -> str:
    """The run directory whose privacy ledger a DP stage writes: --run_dir, else the parent of --output_dir
    (`settings`: a DPConfig or the stage's parsed arguments)."""
    return settings.run_dir or os.path.dirname(os.path.abspath(settings.output_dir))


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for `purpose` derived from `seed` (--deterministic_dp's seeds; the audit canaries' from the
    secret sampling seed)."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class UnitMembers:
    """Each privacy unit's examples: units numbered in the order of their first example, unit u holding the dataset
    positions `order[starts[u]:starts[u + 1]]`."""

    def __init__(self, labels):
        numbers = {}
        unit_of = torch.tensor([numbers.setdefault(label, len(numbers)) for label in labels], dtype=torch.long)
        self.count = len(numbers)
        self.order = unit_of.argsort(stable=True)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(unit_of).cumsum(0)])

    def draw(self, chosen: torch.Tensor, limit: int, generator: torch.Generator) -> list:
        """The examples of each unit in `chosen`: all of them, or `limit` of them chosen by `generator` (the same
        random key per example whatever else is drawn, so each unit's choice depends on its own examples only)."""
        keys = torch.rand(len(self.order), generator=generator)
        groups = []
        for unit in chosen.tolist():
            members = self.order[self.starts[unit]:self.starts[unit + 1]]
            if len(members) > limit:
                members = members[keys[members].argsort()[:limit]]
            groups.append(members)
        return groups


def private_state_dir(output_dir: str) -> str:
    """Where a DP stage keeps its private training state: beside its output, never inside a release."""
    return output_dir.rstrip("/") + PRIVATE_SUFFIX


def discard_training_state(output_dir: str, keep: bool = False) -> None:
    """Delete a finished stage's private training state, or warn that it is kept."""
    state_dir = private_state_dir(output_dir)
    if not os.path.isdir(state_dir):
        return
    if keep:
        warnings.warn(f"--keep_training_state: {state_dir} holds the DP randomness (seeds) and is not covered by the "
                      "guarantee; never share it", stacklevel=2)
    else:
        shutil.rmtree(state_dir)


class DPTrainer:
    """Trains `model` on `dataset` (indexable; `collate_fn` turns a list of examples into a batch of tensors).

    `loss_fn(model, batch)` returns per-example losses; `config` holds the loop's settings (`DPConfig`).
    `eval_fn(model)`, if given, returns a dict of metrics and runs after every epoch on the main process.
    `lengths`, if given (one per example), orders each step's examples by length before they are split into
    micro-batches: less padding, and the same clipped sum, since it does not depend on the order.
    `units` (one label per example, e.g. its sender) is required with `--privacy_unit sender`: the loop then
    samples units, and each sampled unit contributes one gradient clipped to C, the sum of at most
    `--max_examples_per_unit` of its examples' gradients (a micro-batch holds up to the per-device batch of units).
    `private_units`: how many units are private (stage 3 also trains on public negatives): delta's n.
    `unit_column`: the data column the units were read from, recorded with the unit in privacy.json and the ledger.

    Use: `train()`, then `release(save_model)` (ledger entry, model, privacy.json), then
    `discard_training_state()` once the stage's own outputs are written.
    """

    def __init__(self, model, dataset, collate_fn, loss_fn, config: DPConfig, stage: str, private_data: str,
                 eval_fn=None, lengths=None, private_units=None, units=None, unit_column=None):
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.model = model.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process starts from the main process's weights
            for tensor in list(self.model.parameters()) + list(self.model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)
        self.dataset, self.collate_fn, self.loss_fn, self.eval_fn = dataset, collate_fn, loss_fn, eval_fn
        self.config, self.stage, self.private_data = config, stage, private_data
        self.num_examples = len(dataset)
        self.unit_level = config.privacy_unit != "example"
        if self.unit_level and (units is None or len(units) != self.num_examples):
            raise ValueError(f"--privacy_unit {config.privacy_unit}: the trainer needs one unit label per example")
        self.units = UnitMembers(units) if self.unit_level else None
        self.unit_column = unit_column if self.unit_level else None
        self.num_units = self.units.count if self.unit_level else self.num_examples
        # the private units among them (stage 3 trains on public negatives too): what delta is measured against
        self.private_units = private_units or self.num_units
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        if self.lengths is not None and self.lengths.shape != (self.num_examples,):
            raise ValueError(f"lengths: one per example expected ({self.num_examples}), "
                             f"got shape {tuple(self.lengths.shape)}")
        self.logical_batch = (config.per_device_train_batch_size * config.gradient_accumulation_steps
                              * self.accelerator.num_processes)
        self._check_arguments()
        self.sample_rate = self.logical_batch / self.num_units
        self.steps_per_epoch = max(1, self.num_units // self.logical_batch)
        self.total_steps = config.max_train_steps or math.ceil(config.num_train_epochs * self.steps_per_epoch)
        self.delta = config.delta if config.delta is not None else default_delta(self.private_units)
        self.run_dir = ledger_dir(config)
        try:
            ledger.check_unit(self.run_dir, private_data, config.privacy_unit, self.unit_column)
        except ValueError as error:
            raise DataError(f"--privacy_unit {config.privacy_unit}: {error}") from None
        self.state_dir = private_state_dir(config.output_dir)
        resume_path = resolve_checkpoint(config.resume_from_checkpoint, self.state_dir)
        state = self._read_checkpoint(resume_path) if resume_path else None
        self.run_id = state["run_id"] if state else self._from_main_process([uuid.uuid4().hex])[0]
        if config.noise_multiplier is None:
            earlier = [] if config.target_epsilon_scope == "stage" else [
                e for e in ledger.counted_entries(self.run_dir) if e.get("run_id") != self.run_id]
            try:
                self.noise_multiplier = calibrate_noise_multiplier(
                    config.target_epsilon, self.sample_rate, self.total_steps,
                    ledger.composition_delta(earlier + [{"delta": self.delta}]), config.sampling,
                    steps_per_epoch=self.steps_per_epoch, earlier=[Mechanism.from_dict(e) for e in earlier])
            except ValueError as error:  # the budget cannot be met: the user's settings
                raise DataError(f"--target_epsilon {config.target_epsilon}: {error}") from None
        else:
            self.noise_multiplier = config.noise_multiplier
        if config.sampling == "shuffle":
            warnings.warn("--sampling shuffle: fixed-size shuffled batches get no amplification by subsampling, so "
                          "epsilon is accounted as one Gaussian mechanism per epoch; the paper's epsilon assumed "
                          "Poisson sampling", stacklevel=2)
        self.engine = PerExampleGradients(self.model, config.max_grad_norm)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.step, self.history = 0, []
        if state:
            self._load_state(resume_path, state)
        else:
            self.sampling_seed, self.noise_seed = self._new_seeds()
        self.canaries = self._make_canaries()
        if state and self.canaries is not None:
            self.canaries.load_state_dict(state["canaries"])

    def _make_canaries(self):
        """The white-box audit's canaries (--audit_canaries), drawn from the secret sampling seed; or None."""
        count = self.config.audit_canaries
        if not count:
            return None
        num_parameters = sum(p.numel() for p in self.params)
        if self.config.sampling != "poisson":
            raise DataError("--audit_canaries: the canaries join the Poisson draws; use --sampling poisson")
        if not 2 <= count <= min(num_parameters, 2 * self.num_units):
            raise DataError(f"--audit_canaries {count}: between 2 and min(trainable parameters, 2 x training "
                            f"{self.unit_name}s) = {min(num_parameters, 2 * self.num_units):,} (one coordinate each; "
                            f"more canaries than {self.unit_name}s would outweigh the data)")
        return GradientCanaries(count, num_parameters, derived_seed(self.sampling_seed, "audit canaries"),
                                self.sample_rate, self.config.max_grad_norm)

    def _new_seeds(self):
        """(sampling seed, noise seed): secret by default, the same on every process."""
        if self.config.deterministic_dp:
            run = json.dumps(self._deterministic_run(), sort_keys=True, default=str)
            return derived_seed(self.config.seed, f"{run}:sampling"), derived_seed(self.config.seed, f"{run}:noise")
        seeds = self._from_main_process([secrets.randbits(63), secrets.randbits(63)])
        return seeds[0], seeds[1]

    def _deterministic_run(self):
        """What --deterministic_dp derives the seeds from besides --seed: the stage, the mechanism (noise multiplier as
        calibrated, logical batch, n) and every setting and input (keyed fingerprints of paths), so that two releases
        share noise only if they are the same run on the same data, and are then equal. Neighbours differ in n."""
        settings = {k: v for k, v in self.config.stage_settings.items() if k not in NOT_SETTINGS | MICRO_BATCHING}
        inputs = {v: fingerprint(v) for v in settings.values() if isinstance(v, str) and os.path.exists(v)}
        return {"stage": self.stage, "settings": settings, "inputs": inputs, "num_examples": self.num_examples,
                "num_units": self.num_units, "noise_multiplier": self.noise_multiplier,
                "logical_batch": self.logical_batch}

    def _from_main_process(self, values):
        """`values` as the main process drew them, on every process."""
        return broadcast_object_list(values, from_process=0) if self.accelerator.num_processes > 1 else values

    @property
    def unit_name(self):
        return self.config.privacy_unit

    @property
    def dp_randomness(self):
        if self.config.deterministic_dp:
            return "derived from --seed (--deterministic_dp): the guarantee holds only if that seed is kept secret"
        return SECRET_RANDOMNESS

    def _check_arguments(self):
        config = self.config
        if (config.noise_multiplier is None) == (config.target_epsilon is None):
            raise DataError("give exactly one of --noise_multiplier and --target_epsilon")
        if config.noise_multiplier is not None and not 0 <= config.noise_multiplier < 1e4:
            raise DataError(f"--noise_multiplier must be in [0, 1e4), got {config.noise_multiplier}")
        if config.target_epsilon is not None and not config.target_epsilon > 0:
            raise DataError(f"--target_epsilon must be positive, got {config.target_epsilon}")
        if not 0 < config.max_grad_norm < math.inf:
            raise DataError(f"--max_grad_norm must be positive and finite, got {config.max_grad_norm}")
        if config.delta is not None and not 0 < config.delta < 1 / self.private_units:
            raise DataError(f"--delta must be in (0, 1/n) for n private {self.unit_name}s: "
                            f"(0, {1 / self.private_units:.3g}), got {config.delta}")
        if config.per_device_train_batch_size < 1 or config.gradient_accumulation_steps < 1:
            raise DataError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if config.max_examples_per_unit < 1:
            raise DataError(f"--max_examples_per_unit must be >= 1, got {config.max_examples_per_unit}")
        if self.unit_level and self.num_units == 1:
            raise DataError(f"--privacy_unit {config.privacy_unit}: every training example belongs to one "
                            f"{self.unit_name}; check the unit column")
        if self.logical_batch > self.num_units:
            raise DataError(f"the logical batch ({self.logical_batch} = per-device batch x accumulation x "
                            f"processes) is larger than the dataset ({self.num_units} {self.unit_name}s)")

    def _make_optimizer(self):
        config = self.config
        if config.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        return optimizer(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def _make_scheduler(self):
        warmup, total = self.config.num_warmup_steps, self.total_steps
        linear = self.config.lr_scheduler_type == "linear"

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup)) if linear else 1.0
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    # --- sampling and privatisation -------------------------------------------------------

    def step_indices(self, step: int):
        """This process's share of logical step `step`'s draw: the examples (a tensor of dataset positions), or at
        unit level a list with the examples of each sampled unit."""
        if self.config.sampling == "poisson":
            generator = torch.Generator().manual_seed(self.sampling_seed + step)
            chosen = (torch.rand(self.num_units, generator=generator) < self.sample_rate).nonzero().flatten()
        else:
            epoch, position = divmod(step, self.steps_per_epoch)
            generator = torch.Generator().manual_seed(self.sampling_seed + epoch)
            order = torch.randperm(self.num_units, generator=generator)
            chosen = order[position * self.logical_batch:(position + 1) * self.logical_batch]
        chosen = chosen[self.accelerator.process_index::self.accelerator.num_processes]
        if not self.unit_level:
            return chosen
        generator = torch.Generator().manual_seed(derived_seed(self.sampling_seed, "examples of a unit") + step)
        return self.units.draw(chosen, self.config.max_examples_per_unit, generator)

    def privatise_gradients(self, step: int) -> None:
        """Sum the clipped sums over processes, add the noise once, divide by the expected batch size."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                          for p in self.params])
        if self.accelerator.is_main_process:
            if self.canaries is not None:
                self.canaries.add_to(flat, step)
            if self.noise_multiplier > 0:
                generator = torch.Generator(device=flat.device).manual_seed(self.noise_seed + step)
                noise = torch.randn(flat.shape, generator=generator, device=flat.device)
                flat += noise * (self.noise_multiplier * self.config.max_grad_norm)
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="sum")
        if self.canaries is not None:
            self.canaries.observe(flat)
        flat /= self.logical_batch  # the expected logical batch (Poisson) or the fixed one (shuffle)
        for param, grad in zip(self.params, flat.split([p.numel() for p in self.params])):
            param.grad = grad.view_as(param).to(param.dtype)

    def mechanism(self, steps: Optional[int] = None) -> Mechanism:
        return Mechanism(self.noise_multiplier, self.sample_rate, self.step if steps is None else steps,
                         self.config.sampling, self.steps_per_epoch)

    def epsilons(self) -> dict:
        return compute_epsilons([self.mechanism()], self.delta)

    # --- the loop ---------------------------------------------------------------------------

    def accumulate_clipped_sum(self, indices) -> None:
        """Add the flat-clipped gradients of a step's draw (`step_indices`) to `.grad`, in micro-batches of at most
        the per-device batch of examples (of units, each with its examples, at unit level), ordered by length when
        lengths were given."""
        # eval mode: no dropout, whose masks (public randomness by batch position) would let one example move the
        # others' gradients, so that the clipped sums of neighbouring data sets could differ by more than C
        self.model.eval()
        size = self.config.per_device_train_batch_size
        if not self.unit_level:
            if self.lengths is not None:
                indices = indices[self.lengths[indices].argsort(stable=True)]
            for chunk in indices.split(size):
                self._backward([chunk])
            return
        groups = indices
        if self.lengths is not None:
            groups = sorted(groups, key=lambda members: int(self.lengths[members].max()))
        for start in range(0, len(groups), size):
            self._backward(groups[start:start + size])

    def _backward(self, groups: list) -> None:
        """One micro-batch: each tensor of `groups` is the examples of one unit (at example level, one tensor of
        examples that are each their own unit)."""
        chunk = torch.cat(groups)
        units = None
        if self.unit_level:
            units = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
        batch = self.collate_fn([self.dataset[i] for i in chunk.tolist()])
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        autocast = torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16,
                                  enabled=self.config.mixed_precision == "bf16")
        with autocast:
            losses = self.loss_fn(self.model, batch)
        try:
            self.engine.backward(losses, units=units)
        except NonFiniteGradientError as error:
            # a loss is an example's; at unit level a norm is a unit's
            bad = (chunk[error.examples] if units is None or error.quantity == "loss"
                   else torch.cat([groups[u] for u in error.examples]))
            rows = ", ".join(str(int(row)) for row in bad[:5])
            raise DataError(f"{self.stage}: training example(s) at row {rows} of the training set give a "
                            f"non-finite {error.quantity}; nothing was released (fix or remove them)") from None

    def train(self) -> None:
        """Run the DP steps (from the resumed step on); the private training state is saved at the end."""
        public = self.num_units - self.private_units
        units = (f"{self.num_units} units ({self.private_units} {self.unit_name}s"
                 + (f", {public} public examples" if public else "") + f") with {self.num_examples} examples (at "
                 f"most {self.config.max_examples_per_unit} per unit and step)" if self.unit_level else
                 self.num_examples)
        self.print(f"DP training ({self.stage}): n={units}, expected logical batch {self.logical_batch} "
                   f"(q={self.sample_rate:.4g}, {self.config.sampling}), {self.total_steps} steps, noise multiplier "
                   f"{self.noise_multiplier:.4g}, clip {self.config.max_grad_norm}, delta {self.delta:.3g}"
                   + ("" if self.step == 0 else f"; resumed at step {self.step}"))
        if self.total_steps < FEW_STEPS and self.noise_multiplier > 0:
            self.print(f"note: {self.total_steps} noisy steps are few for {self.num_units:,} {self.unit_name}s; more "
                       "come from more epochs (--num_train_epochs) or a smaller logical batch "
                       "(--per_device_train_batch_size x --gradient_accumulation_steps): docs/own_data.md, small "
                       "private sets")
        progress = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, unit="step",
                        disable=not self.accelerator.is_main_process)
        while self.step < self.total_steps:
            # an empty Poisson draw is still a step: the noise alone (the realised size is secret: never logged)
            indices = self.step_indices(self.step)
            if len(indices):
                self.accumulate_clipped_sum(indices)
            self.privatise_gradients(self.step)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            progress.update(1)
            progress.set_postfix(lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
            if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                self.end_of_epoch()
            if self.config.checkpointing_steps and self.step % self.config.checkpointing_steps == 0:
                self.save_checkpoint()
        progress.close()
        self.save_checkpoint()

    def end_of_epoch(self):
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "epsilon": self.epsilons()}
        if self.eval_fn is not None and self.accelerator.is_main_process:
            with torch.no_grad():
                record.update(self.eval_fn(self.model))
        self.history.append(record)
        self.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                            if k != "epsilon") + f" epsilon={record['epsilon']['epsilon']:.3f}")

    def privacy_report(self) -> dict:
        """What privacy.json holds: the mechanism, its epsilon, where its randomness came from; no seed."""
        unit = {"privacy_unit": self.unit_name,
                "adjacency": ADJACENCY[self.config.sampling].format(unit=UNIT_ADJACENCY[self.unit_name]),
                "num_examples": self.num_examples}
        if self.unit_level:
            unit.update(unit_column=self.unit_column, num_units=self.num_units, private_units=self.private_units,
                        max_examples_per_unit=self.config.max_examples_per_unit)
        return {"stage": self.stage, "run_id": self.run_id, "private_data": self.private_data, **unit,
                "expected_logical_batch_size": self.logical_batch,
                "max_grad_norm": self.config.max_grad_norm, "delta": self.delta, **self.mechanism().as_dict(),
                "epsilon": self.epsilons(), "dp_randomness": self.dp_randomness, "ledger": self.run_dir}

    def release(self, save_model: Callable[[str], None], release_dir: Optional[str] = None) -> dict:
        """Record the run in the privacy ledger, then write the release: `save_model(release_dir)` and
        privacy.json (default: --output_dir). Returns the privacy report. Main process only writes."""
        release_dir = release_dir or self.config.output_dir
        report = self.privacy_report()
        if self.accelerator.is_main_process:
            # the ledger first: a release that exists is always counted
            ledger.record(self.run_dir, self.stage, self.run_id, self.mechanism(), self.delta,
                          self.private_data, release=os.path.abspath(self.config.output_dir),
                          dp_randomness="deterministic" if self.config.deterministic_dp else "secret",
                          adjacency=report["adjacency"], privacy_unit=report["privacy_unit"],
                          unit_column=self.unit_column)
            os.makedirs(release_dir, exist_ok=True)
            # privacy.json before the model: from here on the ledger sees the release named on disk
            write_json(os.path.join(release_dir, ledger.PRIVACY_REPORT_NAME), report)
            save_model(release_dir)
            if self.canaries is not None:
                write_json(os.path.join(release_dir, AUDIT_NAME), self.audit_report(report))
            composed, delta = ledger.composed_epsilon(self.run_dir)
            self.print(f"epsilon of this stage: {report['epsilon']['epsilon']:.3f}, composed over the "
                       f"{len(ledger.counted_entries(self.run_dir))} counted releases in the run's ledger: "
                       f"{composed['epsilon']:.3f} at delta {delta:.3g} (PRV upper bounds)")
            if self.config.deterministic_dp:
                self.print("--deterministic_dp: the guarantee holds only if --seed is kept secret")
        self.accelerator.wait_for_everyone()
        return report

    def audit_report(self, privacy_report: dict) -> dict:
        """What audit.json holds: the white-box audit's lower bound beside the accountant's epsilon at one delta."""
        result = self.canaries.result(self.delta)
        accountant = privacy_report["epsilon"]["epsilon"]
        return {"kind": "white-box: gradient canaries of norm C on one coordinate each (Steinke et al. 2023)",
                **asdict(result), "accountant_epsilon": accountant,
                "ratio": result.epsilon_lower_bound / accountant if accountant > 0 else None,
                "expected_canaries_per_step": self.sample_rate * float(self.canaries.included.sum())}

    def discard_training_state(self) -> None:
        if self.accelerator.is_main_process:
            discard_training_state(self.config.output_dir, self.config.keep_training_state)

    # --- the private training state ---------------------------------------------------------

    def run_signature(self):
        """What must match for a checkpoint to continue this run."""
        return {"stage": self.stage, "num_examples": self.num_examples, "logical_batch": self.logical_batch,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.config.max_grad_norm,
                "sampling": self.config.sampling, "seed": self.config.seed, "total_steps": self.total_steps,
                "delta": self.delta, "deterministic_dp": self.config.deterministic_dp,
                "audit_canaries": self.config.audit_canaries, "privacy_unit": self.unit_name,
                "num_units": self.num_units,
                "max_examples_per_unit": self.config.max_examples_per_unit if self.unit_level else None}

    def save_checkpoint(self):
        """Private state only: model, optimiser, step and the DP seeds. Older checkpoints are removed."""
        if not self.accelerator.is_main_process:
            return
        final_dir = os.path.join(self.state_dir, f"checkpoint-{self.step}")
        with atomic_directory(final_dir) as tmp_dir:
            os.makedirs(tmp_dir)
            torch.save({"signature": self.run_signature(), "step": self.step, "run_id": self.run_id,
                        "sampling_seed": self.sampling_seed, "noise_seed": self.noise_seed,
                        "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "history": self.history,
                        "canaries": self.canaries.state_dict() if self.canaries is not None else None},
                       os.path.join(tmp_dir, STATE_FILE))
        for name in os.listdir(self.state_dir):
            if name.startswith("checkpoint-") and name != os.path.basename(final_dir):
                shutil.rmtree(os.path.join(self.state_dir, name), ignore_errors=True)

    def _read_checkpoint(self, path):
        state_path = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_path):
            raise DataError(f"--resume_from_checkpoint {path}: no {STATE_FILE} in it")
        try:
            state = torch.load(state_path, map_location=self.accelerator.device, weights_only=True)
        except Exception as error:  # whatever torch's unpickler raises on a damaged file
            raise DataError(f"{state_path}: corrupted or not a checkpoint of this stage ({type(error).__name__}); "
                            "delete it to start the stage afresh") from None
        if not isinstance(state, dict) or "signature" not in state:
            raise DataError(f"{state_path}: corrupted or not a checkpoint of this stage (no run signature)")
        return state

    def _load_state(self, path, state):
        mine = self.run_signature()
        # a checkpoint written before the audit and the privacy units existed: no canaries, one unit per example
        theirs = {"audit_canaries": 0, "privacy_unit": "example", "num_units": self.num_examples,
                  "max_examples_per_unit": None, **state["signature"]}
        different = {k: (theirs.get(k), mine.get(k)) for k in mine.keys() | theirs.keys()
                     if theirs.get(k) != mine.get(k)}
        if different:
            raise DataError(f"checkpoint {path} belongs to another run: " + ", ".join(
                f"{k} {old} != {new}" for k, (old, new) in different.items()))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history = state["step"], state["history"]
        self.sampling_seed, self.noise_seed = state["sampling_seed"], state["noise_seed"]

    def print(self, message):
        if self.accelerator.is_main_process:
            tqdm.write(message)

"""Time and peak memory of one DP optimiser step, as ratios to a non-private step in the same process.

GPT-2 (4 layers, width 256, 4 heads, vocab 8192, all parameters trainable), batch 32:
non-private, this engine, and Opacus (hooks and ghost modes, if installed:
`pip install -r requirements-bench.txt`), for sequence classification and for the
LM-head model with tied weights (Opacus's ghost mode refuses tied weights, so it runs on
the same model with an untied LM head). Variants run interleaved, each `--repeats` times;
the table gives the minimum and the median time, and ratios of the medians. "this engine,
probing" runs the engine's batch-axis probes on every step instead of the first only: the
cost of a probing step. Peak memory = memory held before the step (parameters, gradients,
optimiser state) plus the largest amount allocated during the step, from the profiler's
allocation events. A second table splits the timed steps of the non-private step and the
engine into phases: forward, backward (for the engine, its four phases: output gradients,
factors, norms, clipped sums), noise, optimiser.

    python scripts/benchmark_engine.py [--seq_lens 64 128 256] [--repeats 7] [--models classification lm]
"""

import argparse
import copy
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from common.dp.per_example_grads import PerExampleGradients

NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0


def per_example_loss(logits, labels, lm):
    if not lm:
        return F.cross_entropy(logits, labels, reduction="none")
    token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    return token_losses.mean(1)


def positions(ids):
    return torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)


@contextmanager
def timed(phases, name):
    """Add the seconds the block takes to phases[name] (a list), if phases is a dict."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if phases is not None:
        phases.setdefault(name, []).append(time.perf_counter() - start)


def mean_loss_step(module, optimizer, lm):
    """A step whose backward is autograd's own on the batch-mean loss (non-private, Opacus hooks)."""
    def step(ids, labels, phases=None):
        with timed(phases, "forward"):
            loss = per_example_loss(module(input_ids=ids, position_ids=positions(ids)).logits, labels, lm).mean()
        with timed(phases, "backward"):
            loss.backward()
        with timed(phases, "optimiser"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def non_private(model, lm, batch_size):
    return mean_loss_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), lm)


def this_engine(model, lm, batch_size, probe_every_step=False):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = PerExampleGradients(model, MAX_GRAD_NORM)
    current = {"phases": None}  # where the engine's own phases are recorded during a step
    for phase, method in (("output gradients", "_output_grads"), ("factors", "_factors"), ("norms", "_clip_factors"),
                          ("clipped sums", "_add_clipped_sums")):
        def timed_method(*args, _phase=phase, _method=getattr(engine, method)):
            with timed(current["phases"], _phase):
                return _method(*args)
        setattr(engine, method, timed_method)

    def step(ids, labels, phases=None):
        if probe_every_step:
            engine._probed_patterns.clear()
        current["phases"] = phases
        with timed(phases, "forward"):
            losses = per_example_loss(model(input_ids=ids, position_ids=positions(ids)).logits, labels, lm)
        with timed(phases, "backward"):
            engine.backward(losses)
        with timed(phases, "noise"):
            for param in model.parameters():
                param.grad.add_(torch.randn_like(param.grad), alpha=NOISE_MULTIPLIER * MAX_GRAD_NORM).div_(batch_size)
        with timed(phases, "optimiser"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step, optimizer


def opacus_hooks(model, lm, batch_size):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    module = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.AdamW(module.parameters(), lr=1e-4), noise_multiplier=NOISE_MULTIPLIER,
                            max_grad_norm=MAX_GRAD_NORM, expected_batch_size=batch_size)
    return mean_loss_step(module, optimizer, lm)


def this_engine_probing(model, lm, batch_size):
    return this_engine(model, lm, batch_size, probe_every_step=True)


def opacus_ghost(model, lm, batch_size):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    if lm:  # ghost clipping refuses tied parameters: give the LM head its own copy of the weights
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    module = GradSampleModuleFastGradientClipping(model, max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(torch.optim.AdamW(module.parameters(), lr=1e-4),
                                                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                                expected_batch_size=batch_size)
    criterion = DPLossFastGradientClipping(module, optimizer, torch.nn.CrossEntropyLoss(reduction="mean"))

    def step(ids, labels, phases=None):
        logits = module(input_ids=ids, position_ids=positions(ids)).logits
        shape = None
        if lm:  # Opacus takes flattened tokens and the (B, T, V) shape to average them per example
            shape = logits[:, :-1].shape
            logits, labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
        criterion(logits, labels, shape=shape).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer


VARIANTS = {"non-private": non_private, "this engine": this_engine, "this engine, probing": this_engine_probing,
            "Opacus hooks": opacus_hooks, "Opacus ghost": opacus_ghost}


def resting_bytes(model, optimizer):
    tensors = {id(p): p for p in model.parameters()}
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    for state in optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_bytes(step, model, optimizer, ids, labels):
    before = resting_bytes(model, optimizer)
    if ids.device.type == "cuda":  # the allocator's own peak, from the memory held before the step
        torch.cuda.synchronize(ids.device)
        torch.cuda.reset_peak_memory_stats(ids.device)
        start = torch.cuda.memory_allocated(ids.device)
        step(ids, labels)
        torch.cuda.synchronize(ids.device)
        return before + torch.cuda.max_memory_allocated(ids.device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(ids, labels)
    allocations = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
    in_use = peak = 0
    for _, nbytes in allocations:
        in_use += nbytes
        peak = max(peak, in_use)
    return before + peak


def measure(lm, seq_len, args):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=max(256, seq_len), n_embd=args.width,
                        n_layer=args.layers, n_head=4, num_labels=2, pad_token_id=0)
    device = torch.device(args.device)
    base = (GPT2LMHeadModel if lm else GPT2ForSequenceClassification)(config).to(device)
    batch_size = args.batch_size
    ids = torch.randint(1, args.vocab_size, (batch_size, seq_len), device=device)
    labels = ids if lm else torch.randint(0, 2, (batch_size,), device=device)
    steps, results = {}, {}
    for name in args.variants:
        make = VARIANTS[name]
        model = copy.deepcopy(base).train()
        try:
            step, optimizer = make(model, lm, batch_size)
            step(ids, labels)  # warm-up, creates the optimiser state
            memory = peak_step_bytes(step, model, optimizer, ids, labels)
            steps[name] = step
            results[name] = {"times": [], "memory": memory, "phases": {}}
        except ImportError:
            results[name] = {"error": "not installed (pip install -r requirements-bench.txt)"}
        except Exception as error:  # report why a library refuses the model, then go on
            results[name] = {"error": f"cannot run: {type(error).__name__}: {str(error).splitlines()[0][:70]}"}
    for _ in range(args.repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step(ids, labels, results[name]["phases"])
            synchronize(device)
            results[name]["times"].append(time.perf_counter() - start)
    return results


PHASES = ("forward", "backward", "output gradients", "factors", "norms", "clipped sums", "noise", "optimiser")


def print_phases(rows):
    print("\nWhere the time goes: median ms per step of each phase over the timed steps (the engine's backward is its "
          "four phases: output gradients, factors, norms, clipped sums):\n")
    print("| T | variant | forward | backward | output gradients | factors | norms | clipped sums | noise | "
          "optimiser |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq_len, name, phases in rows:
        cells = " | ".join(f"{1000 * statistics.median(phases[phase]):.0f}" if phase in phases else "-"
                           for phase in PHASES)
        print(f"| {seq_len} | {name} | {cells} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--models", nargs="+", choices=("classification", "lm"), default=["classification", "lm"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="non-private is always run: the ratios are against it")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (times synchronised, the allocator's peak)")
    args = parser.parse_args(argv)
    args.variants = ["non-private"] + [v for v in args.variants if v != "non-private"]
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}, batch {args.batch_size}, "
          f"width {args.width}, {args.layers} layers, vocab {args.vocab_size}, {args.repeats} repeats")
    for lm in [model == "lm" for model in args.models]:
        print(f"\n### GPT-2 {'LM head, tied weights' if lm else 'sequence classification'}\n")
        print("| T | variant | time min / median (s) | time ratio | peak memory (MB) | memory ratio |")
        print("|---|---|---|---|---|---|")
        phase_rows = []
        for seq_len in args.seq_lens:
            results = measure(lm, seq_len, args)
            phase_rows += [(seq_len, name, results[name]["phases"]) for name in ("non-private", "this engine")
                           if "phases" in results.get(name, {})]
            base = results["non-private"]
            base_time = statistics.median(base["times"])
            for name, result in results.items():
                if "error" in result:
                    print(f"| {seq_len} | {name} | {result['error']} | | | |")
                    continue
                seconds = statistics.median(result["times"])
                label = "Opacus ghost (LM head untied)" if lm and name == "Opacus ghost" else name
                print(f"| {seq_len} | {label} | {min(result['times']):.3f} / {seconds:.3f} | "
                      f"{seconds / base_time:.2f}x | {result['memory'] / 2**20:.0f} | "
                      f"{result['memory'] / base['memory']:.2f}x |", flush=True)
        print_phases(phase_rows)


if __name__ == "__main__":
    main()

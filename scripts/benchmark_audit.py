"""How tight the one-run audit is, and what it costs, at the main job's DP fine-tuning (next-word prediction).

For each setting, one DP fine-tuning of a stage 5 model on the chat target with the preset's stage 6 recipe
(parsed by stage 6 itself) and two kinds of canaries, each included with probability 1/2 by a secret coin:
  * white-box: --audit_canaries gradient canaries of the DP loop (common/dp/audit.py), scored on every noisy update;
  * black-box: as many random-word messages (the secret sharer's canaries) added to the training messages, scored
    by their loss in the fine-tuned model, with their exposure against random messages never trained on.
Settings: a stage epsilon of 1, 4 and 16; clipping without noise; and two broken mechanisms, claiming epsilon 1, then
4: one adds a tenth of the noise while the accountant is told the whole, one switches clipping off (every clip factor
1) while the noise and the accountant assume the clip norm. Also the time of the audited fine-tuning
at epsilon 4 against the same fine-tuning without canaries, in the same process.

    python scripts/benchmark_audit.py --model_name_or_path runs/demo_lm/pretrained --output_dir results/audit

Nothing here is a release: no ledger entry, no model saved; the private training state is deleted after each run.
"""

import argparse
import csv
import os
import secrets
import shutil
import statistics
import subprocess
import time

from datasets import Dataset, concatenate_datasets

from common.atomic_io import atomic_path
from common.data import load_target_task
from common.demo_data import DEFAULT_CACHE_DIR
from common.dp.accounting import Mechanism, compute_epsilons
from common.dp.training import DPConfig, DPTrainer, discard_training_state
from common.language_modelling import MessageCanaries
from common.models import load_finetuning_model
from common.splits import stable_sample
from common.stage import DataError, run_stage
from dp_finetuning import dp_finetune
from dp_finetuning.tasks import language_modelling_parts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="runs/demo_lm/pretrained", help="a stage 5 output")
    parser.add_argument("--target", default="chat")
    parser.add_argument("--preset", default="demo", help="stage 6's recipe: FINETUNE_LM in scripts/presets/<preset>.sh")
    parser.add_argument("--canaries", type=int, default=1000, help="canaries of each kind")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--broken_epsilons", type=float, nargs="+", default=[1.0, 4.0],
                        help="what the broken mechanism claims (one run each)")
    parser.add_argument("--timing_epsilon", type=float, default=4.0, help="audited against plain at this epsilon")
    parser.add_argument("--timing_only", type=int, default=0, metavar="REPEATS",
                        help="only time, REPEATS times interleaved, the fine-tuning at --timing_epsilon plain, with "
                             "the white-box canaries (what --audit_canaries adds to a stage) and with both kinds; "
                             "writes timing.md")
    parser.add_argument("--output_dir", default="results/audit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    return parser.parse_args(argv)


def preset_recipe(preset):
    """The preset's stage 6 flags for next-word prediction, as bash reads them (scripts/presets/<preset>.sh)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets", f"{preset}.sh")
    if not os.path.isfile(path):
        raise DataError(f"--preset {preset}: no {path}")
    completed = subprocess.run(["bash", "-c", f'source "{path}"; printf "%s\\0" "${{FINETUNE_LM[@]}}"'],
                               capture_output=True, text=True, check=True)
    return completed.stdout.split("\0")[:-1]


def stage6_args(args, work_dir, noise, canaries):
    """Stage 6's parsed settings for one setting: the preset's recipe, the noise, the canaries."""
    return dp_finetune.parse_args(["--task", "lm", "--model_name_or_path", args.model_name_or_path, "--target",
                                   args.target, *args.recipe, *noise, "--output_dir", work_dir, "--audit_canaries",
                                   str(canaries), "--seed", str(args.seed)])


def run_setting(args, train_set, name, noise, canaries=True, broken=False, unclipped=False, black_box_too=True):
    """One DP fine-tuning with (or without) both kinds of canaries (or the white-box kind alone); returns the table's
    row."""
    model, tokenizer = load_finetuning_model(args.model_name_or_path, "lm", seed=args.seed)
    black_box = MessageCanaries.draw(args.canaries if canaries and black_box_too else 0, secrets.randbits(63),
                                     tokenizer)
    trained_on = black_box.trained_on()
    data = concatenate_datasets([train_set, Dataset.from_dict({"sentence": trained_on})]) if trained_on else train_set
    settings = stage6_args(args, os.path.join(args.output_dir, "work", name), noise, args.canaries if canaries else 0)
    collate, losses, _, lengths = language_modelling_parts(tokenizer, settings.max_length, data, {})
    config = DPConfig.from_args(settings)
    trainer = DPTrainer(model, data, collate, losses, config, stage="audit", private_data=args.target, lengths=lengths)
    claimed = compute_epsilons([Mechanism(trainer.noise_multiplier, trainer.sample_rate, trainer.total_steps)],
                               trainer.delta)["epsilon"] if trainer.noise_multiplier > 0 else float("inf")
    if broken:
        trainer.noise_multiplier /= 10  # the accountant was told the whole: `claimed` is what it prints
    if unclipped:
        trainer.engine.max_grad_norm = float("inf")  # every factor 1; the noise and the claim still assume C
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    discard_training_state(settings.output_dir)
    row = {"setting": name, "noise_multiplier": trainer.noise_multiplier, "accountant_epsilon": claimed,
           "delta": trainer.delta, "sample_rate": trainer.sample_rate, "steps": trainer.total_steps,
           "train_seconds": seconds}
    if not canaries or not black_box_too:
        return row
    white = trainer.canaries.result(trainer.delta)
    trainer.model.eval()
    black, exposure_in, exposure_out = black_box.result(trainer.model, tokenizer, settings.max_length, trainer.delta)
    row.update({"white_box_bound": white.epsilon_lower_bound, "white_box_correct": f"{white.correct}/{white.guesses}",
                "black_box_bound": black.epsilon_lower_bound, "black_box_correct": f"{black.correct}/{black.guesses}",
                "exposure_in": exposure_in, "exposure_out": exposure_out})
    return row


def fmt(value, pattern="{:.3f}"):
    if value is None:
        return "n/a"
    return "inf" if isinstance(value, float) and value == float("inf") else pattern.format(value)


def write_table(args, rows, plain_seconds, audited_seconds):
    lines = [f"At the demo preset's next-word fine-tuning ({args.model_name_or_path}, {args.canaries} canaries of "
             "each kind, each in with probability 1/2; bounds at 95% confidence):", "",
             "| setting | noise multiplier | accountant epsilon | white-box lower bound (correct/guesses) | "
             "black-box lower bound (correct/guesses) | mean exposure, in / out (bits) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['noise_multiplier']:.3g} | {fmt(r['accountant_epsilon'])} | "
                     f"{fmt(r['white_box_bound'])} ({r['white_box_correct']}) | {fmt(r['black_box_bound'])} "
                     f"({r['black_box_correct']}) | {r['exposure_in']:.2f} / {r['exposure_out']:.2f} |")
    never_drawn = (1 - rows[0]["sample_rate"]) ** rows[0]["steps"]
    lines += ["", f"An included canary joins none of the {rows[0]['steps']} steps with probability (1 - q)^steps = "
              f"{never_drawn:.3f} (q = {rows[0]['sample_rate']:.4f}): those look excluded whatever the noise, which "
              "caps the white-box bound at this setting; clipping without noise shows the cap."]
    lines += ["", f"Time of the DP fine-tuning at epsilon {args.timing_epsilon:g}: {audited_seconds:.0f} s audited, "
              f"{plain_seconds:.0f} s without canaries ({audited_seconds / plain_seconds:.2f}x; the black-box canaries "
              "add about half their number to the training messages)."]
    os.makedirs(args.output_dir, exist_ok=True)
    with atomic_path(os.path.join(args.output_dir, "table.md")) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with atomic_path(os.path.join(args.output_dir, "table.csv")) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(lines))


def write_timing(args, train_set):
    """timing.md: the minimum and median seconds of each variant over `--timing_only` interleaved repeats."""
    variants = {"plain": {"canaries": False}, "white-box canaries": {"black_box_too": False},
                "both kinds": {}}
    seconds = {name: [] for name in variants}
    for repeat in range(args.timing_only):
        for name, kind in variants.items():
            row = run_setting(args, train_set, f"timing {repeat} {name}", ["--target_epsilon",
                                                                           str(args.timing_epsilon)], **kind)
            seconds[name].append(row["train_seconds"])
    plain = statistics.median(seconds["plain"])
    lines = [f"The DP fine-tuning at epsilon {args.timing_epsilon:g} ({args.model_name_or_path}, {args.canaries} "
             f"canaries of each kind), {args.timing_only} interleaved repeats:", "",
             "| variant | seconds, min / median | median / plain |", "|---|---|---|"]
    lines += [f"| {name} | {min(values):.1f} / {statistics.median(values):.1f} | "
              f"{statistics.median(values) / plain:.2f}x |" for name, values in seconds.items()]
    shutil.rmtree(os.path.join(args.output_dir, "work"), ignore_errors=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with atomic_path(os.path.join(args.output_dir, "timing.md")) as tmp, open(tmp, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_name_or_path, "model.safetensors")):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no stage 5 model (run the main job first: "
                        "bash scripts/run_pipeline.sh)")
    task = load_target_task(args.target, None, None, args.cache_dir, 0)
    args.recipe = preset_recipe(args.preset)
    train_fraction = stage6_args(args, "unused", [], 0).train_fraction
    train_set = stable_sample(task["train"], train_fraction, args.seed) if train_fraction else task["train"]
    if args.timing_only:
        write_timing(args, train_set)
        return
    plain = run_setting(args, train_set, "plain", ["--target_epsilon", str(args.timing_epsilon)], canaries=False)
    rows = [run_setting(args, train_set, f"epsilon {e:g}", ["--target_epsilon", str(e)]) for e in args.epsilons]
    rows.append(run_setting(args, train_set, "clipping without noise", ["--noise_multiplier", "0"]))
    rows += [run_setting(args, train_set, f"broken: a tenth of the noise, claims {e:g}", ["--target_epsilon", str(e)],
                         broken=True) for e in args.broken_epsilons]
    rows += [run_setting(args, train_set, f"broken: clipping off, claims {e:g}", ["--target_epsilon", str(e)],
                         unclipped=True) for e in args.broken_epsilons]
    audited = next(r for r in rows if r["setting"] == f"epsilon {args.timing_epsilon:g}")
    shutil.rmtree(os.path.join(args.output_dir, "work"), ignore_errors=True)
    write_table(args, rows, plain["train_seconds"], audited["train_seconds"])


if __name__ == "__main__":
    run_stage(main)

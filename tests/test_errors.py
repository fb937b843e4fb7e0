"""Bad input through the stage CLIs: exit code 2, one `error:` line naming the file or flag, nothing left behind."""

import json
import os
import subprocess
import sys

import pytest
from datasets import Dataset

from common.dp import ledger
from common.dp.accounting import Mechanism
from common.stage import run_stage
from data_selection import build_classifier_data, sampling_with_logits, split_sentences, train_domain_classifier
from dp_finetuning import dp_finetune, gradient_snr
from pretraining import pretrain_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny stage 5 model, target files with bad labels, a corrupted model and corrupted checkpoints."""
    base = tmp_path_factory.mktemp("bad_inputs")
    sentences = base / "selected"
    Dataset.from_dict({"text": [f"the film number {i} was long and the sea was grey" for i in range(200)]}) \
        .save_to_disk(str(sentences))
    model = base / "model"
    pretrain_gpt2.main(["--dataset_path", str(sentences), "--output_dir", str(model), "--model_size", "nano",
                        "--vocab_size", "300", "--block_size", "16", "--per_device_train_batch_size", "4",
                        "--max_train_steps", "2", "--checkpointing_steps", "1"])
    truncated = base / "truncated_model"
    truncated.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (truncated / name).write_bytes((model / name).read_bytes())
    (truncated / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:5])
    # a stage 5 checkpoint whose training state is garbage
    broken_pretraining = base / "broken_pretraining"
    (broken_pretraining / "checkpoint-1").mkdir(parents=True)
    for name in os.listdir(model / "checkpoint-1"):
        (broken_pretraining / "checkpoint-1" / name).write_bytes((model / "checkpoint-1" / name).read_bytes())
    (broken_pretraining / "checkpoint-1" / "training_state.pt").write_bytes(b"not a checkpoint")
    # a stage 6 private training state that is garbage
    broken_state = base / "run" / "broken_finetune.private"
    (broken_state / "checkpoint-1").mkdir(parents=True)
    (broken_state / "checkpoint-1" / "training_state.pt").write_bytes(b"\x80\x02junk")
    # a ledger whose classifier already spends more than 0.5
    ledger.record(str(base / "spent"), "domain_classifier", "abc", Mechanism(1.0, 0.1, 100), 1e-5, "demo")
    for name, labels in (("strings", ["negative", "positive"]), ("floats", [0.3, 0.7])):
        directory = base / name
        directory.mkdir()
        for split in ("train", "validation"):
            (directory / f"{split}.jsonl").write_text("".join(
                json.dumps({"sentence": f"a film {i}", "label": labels[i % 2]}) + "\n" for i in range(20)))
    (base / "nocolumn").mkdir()
    for split in ("train", "validation"):
        (base / "nocolumn" / f"{split}.jsonl").write_text('{"body": "a film", "label": 1}\n')
    (base / "empty.txt").write_text("")
    return base


def finetune(model, output, *extra):
    return ["--model_name_or_path", str(model), "--output_dir", str(output), "--noise_multiplier", "1",
            "--per_device_train_batch_size", "4", "--max_length", "16", *extra]


CASES = {
    # stage: (main, argv from the workspace, output directory, expected words)
    "stage 1, missing corpus file": (split_sentences.main, lambda w: [
        "--corpus", str(w / "missing.txt"), "--output_dir", str(w / "o1")], "o1", "missing.txt"),
    "stage 1, empty corpus file": (split_sentences.main, lambda w: [
        "--corpus", str(w / "empty.txt"), "--output_dir", str(w / "o2")], "o2", "empty.txt"),
    "stage 2, missing sentences": (build_classifier_data.main, lambda w: [
        "--sentences_dir", str(w / "nothing"), "--output_dir", str(w / "o3")], "o3", "--sentences_dir"),
    "stage 3, missing classifier data": (train_domain_classifier.main, lambda w: [
        "--data_dir", str(w / "nothing"), "--sentences_dir", str(w / "nothing"), "--output_dir", str(w / "o4"),
        "--noise_multiplier", "1"], "o4", "--data_dir"),
    "stage 4, missing sentences": (sampling_with_logits.main, lambda w: [
        "--sentences_dir", str(w / "nothing"), "--num_tokens", "1", "--random", "--output_dir", str(w / "o5")],
        "o5", "--sentences_dir"),
    "stage 4, budget not positive": (sampling_with_logits.main, lambda w: [
        "--sentences_dir", str(w / "selected"), "--num_tokens", "-2", "--random", "--output_dir", str(w / "o6")],
        "o6", "--num_tokens"),
    "stage 5, missing data": (pretrain_gpt2.main, lambda w: [
        "--dataset_path", str(w / "nothing"), "--output_dir", str(w / "o7")], "o7", "nothing"),
    "stage 5, corrupted checkpoint": (pretrain_gpt2.main, lambda w: [
        "--dataset_path", str(w / "selected"), "--output_dir", str(w / "broken_pretraining"), "--model_size",
        "nano", "--vocab_size", "300", "--block_size", "16", "--per_device_train_batch_size", "4",
        "--resume_from_checkpoint", "latest"], None, "corrupted or not a checkpoint of this stage"),
    "stage 6, missing model": (dp_finetune.main, lambda w: finetune(w / "nothing", w / "run" / "o8"), "run/o8",
                               "--model_name_or_path"),
    "stage 6, truncated model.safetensors": (dp_finetune.main, lambda w: finetune(
        w / "truncated_model", w / "run" / "o9"), "run/o9", "corrupted or not a stage 5 output"),
    "stage 6, string labels": (dp_finetune.main, lambda w: finetune(
        w / "model", w / "run" / "o10", "--target", str(w / "strings")), "run/o10", "'negative'"),
    "stage 6, float labels": (dp_finetune.main, lambda w: finetune(
        w / "model", w / "run" / "o11", "--target", str(w / "floats")), "run/o11", "0.3"),
    "stage 6, missing column": (dp_finetune.main, lambda w: finetune(
        w / "model", w / "run" / "o12", "--target", str(w / "nocolumn")), "run/o12",
        "no column 'text' (nor 'sentence') (columns: body, label); --text_column names"),
    "stage 6, epsilon already spent": (dp_finetune.main, lambda w: [
        "--model_name_or_path", str(w / "model"), "--output_dir", str(w / "spent" / "finetune"), "--target", "demo",
        "--target_epsilon", "0.5", "--target_epsilon_scope", "run", "--per_device_train_batch_size", "64",
        "--train_fraction", "0.02", "--max_length", "16"], "spent/finetune", "already spend"),
    "stage 6, pooling for language modelling": (dp_finetune.main, lambda w: finetune(
        w / "model", w / "run" / "pooled", "--task", "lm", "--pooling", "mean"), "run/pooled", "--pooling"),
    "gradient diagnostic, missing model": (gradient_snr.main, lambda w: [
        "--model_name_or_path", str(w / "nothing"), "--noise_multiplier", "1", "--logical_batch_size", "8"], None,
        "--model_name_or_path"),
    "gradient diagnostic, no examples": (gradient_snr.main, lambda w: [
        "--model_name_or_path", str(w / "model"), "--noise_multiplier", "1", "--logical_batch_size", "8",
        "--num_examples", "0"], None, "--num_examples"),
    "gradient diagnostic, string labels": (gradient_snr.main, lambda w: [
        "--model_name_or_path", str(w / "model"), "--noise_multiplier", "1", "--logical_batch_size", "8",
        "--target", str(w / "strings")], None, "'negative'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_error_line_and_leaves_nothing(case, workspace, capsys):
    main, make_argv, output, expected = CASES[case]
    with pytest.raises(SystemExit) as stopped:
        run_stage(main, make_argv(workspace))
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    if output is not None:
        assert not (workspace / output).exists()


def test_corrupted_private_training_state_is_named(workspace, capsys):
    state = workspace / "run" / "broken_finetune"
    argv = finetune(workspace / "model", state, "--target", "demo", "--train_fraction", "0.004",
                    "--resume_from_checkpoint", "latest")
    with pytest.raises(SystemExit):
        run_stage(dp_finetune.main, argv)
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "training_state.pt: corrupted or not a checkpoint of this stage" in error
    # the user's files stay
    assert "weights_only" not in error and (workspace / "run" / "broken_finetune.private").is_dir()


def test_the_command_line_prints_no_traceback(tmp_path):
    completed = subprocess.run([sys.executable, "data_selection/split_sentences.py", "--corpus",
                                str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "out")],
                               capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ""})
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().startswith("error: ") and "missing.txt" in completed.stderr
    debug = subprocess.run([sys.executable, "data_selection/split_sentences.py", "--corpus",
                            str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "out")],
                           capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": "", "SELECTIVE_PRETRAINING_DEBUG": "1"})
    assert "Traceback" in debug.stderr

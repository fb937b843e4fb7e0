import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(name, *args):
    """stdout and stderr of a script that must succeed, as written: progress bars redraw with \r, not \n."""
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *args],
                               capture_output=True, timeout=1800, cwd=ROOT)
    stdout, stderr = completed.stdout.decode(), completed.stderr.decode()
    assert completed.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout + stderr


def pipeline(*args):
    return script("run_pipeline.sh", *args)


def smoke_table_arguments(base, *extra):
    """The smoke pipeline through scripts/reproduce_table.sh: one seed, stage 1 shared in RUNS/sentences."""
    return ["reproduce_table.sh", "--preset", "smoke", "--seeds", "0", "--runs_dir", str(base / "runs"),
            "--output_dir", str(base / "results"), *extra]


def smoke_table(base, *extra):
    return script(*smoke_table_arguments(base, *extra))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    return base, smoke_table(base)


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(smoke_run):
    base, output = smoke_run
    run_dir = base / "runs" / "nano_0.2_seed0"
    assert (base / "runs" / "sentences" / "stats.json").exists() and not (run_dir / "sentences").exists()
    for path in ("classifier_data/filter_train_nonewline.json",
                 "domain_classifier/classifier/classifier.json", "domain_classifier/scores/complete.json",
                 "selected/selection_report.json", "selected/selection_report.png", "pretrained/eval_results.json",
                 "pretrained/loss.png", "finetune/results.json", "finetune/privacy.json",
                 "baselines/random/finetune/results.json", "baselines/scratch/finetune/results.json"):
        assert (run_dir / path).exists(), path
    results = json.loads((run_dir / "finetune" / "results.json").read_text())
    assert results["task"] == "lm" and results["target"] == "chat" and 1900 < results["train_examples"] < 2300
    assert 1 < results["test_perplexity"] and 0 <= results["test_next_word_accuracy"] <= 1
    assert results["ledger_stages"] == ["domain_classifier", "finetune"]
    assert results["dp_releases"] == ["domain_classifier", "finetune"]
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["domain_classifier", "finetune"]
    assert 3.9 <= results["composed_epsilon"] <= 4.0 and results["epsilon"] < results["composed_epsilon"]
    baseline = json.loads((run_dir / "baselines" / "random" / "finetune" / "results.json").read_text())
    assert baseline["ledger_stages"] == ["finetune"] and 3.9 <= baseline["composed_epsilon"] <= 4.0
    # the no-pre-training baseline's tokenizer and config come from the random selection: public data only
    scratch = json.loads((run_dir / "baselines" / "scratch" / "finetune" / "results.json").read_text())
    assert scratch["model_name_or_path"].endswith("baselines/random/pretrained") and scratch["random_init"]
    assert scratch["dp_releases"] == ["finetune"] and scratch["ledger_stages"] == ["finetune"]
    # releases only: no private training state left, no seed in any privacy report
    assert not list(run_dir.rglob("*.private"))
    assert not [path for path in run_dir.rglob("training_state.pt") if "pretrained" not in path.parts]
    for privacy in run_dir.rglob("privacy.json"):
        assert not any("seed" in key for key in json.loads(privacy.read_text()))
    assert "| selective pre-training |" in output and "| no pre-training |" in output
    # quiet logs: the project's bars and result lines, no library bars or warnings
    # the summary (table, split sizes, classifier, composition, sources) and one line per command and stage
    assert output.count("\n") <= 135 and "Flattening" not in output and "LOAD REPORT" not in output
    assert "[transformers]" not in output and "warning" not in output.lower()
    assert len(re.findall(r"^\w+\.py finished in \d+ s$", output, re.MULTILINE)) == 10  # each stage command's wall time
    assert "test next-word accuracy" in (run_dir / "summary.md").read_text()
    table = (base / "results" / "table.md").read_text()
    budget = json.loads((run_dir / "selected" / "selection_report.json").read_text())["budget_words"]
    for variant in ("selective pre-training", "random pre-training", "no pre-training"):
        assert f"| nano | {budget:,} | {variant} | all | 1 |" in table
    assert (base / "results" / "runs.csv").read_text().count("\n") == 4
    assert (base / "results" / "word_perplexity_vs_tokens.png").stat().st_size > 1000


@pytest.mark.slow
def test_completed_stages_are_skipped(smoke_run):
    base, _ = smoke_run
    run_dir = base / "runs" / "nano_0.2_seed0"
    before = (run_dir / "finetune" / "results.json").stat().st_mtime_ns
    output = smoke_table(base)
    assert output.count("nothing to do") == 10  # stages 1, 2, 3, two selections, two pre-trainings, ...
    assert output.count("finetune is complete; nothing to do") == 3  # ... and three fine-tunings
    assert (run_dir / "finetune" / "results.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_changed_setting_is_refused_then_redone_with_what_depends_on_it(smoke_run):
    base, _ = smoke_run
    run_dir = base / "runs" / "nano_0.2_seed0"
    pretrained = (run_dir / "pretrained" / "eval_results.json").stat().st_mtime_ns
    name, *args = smoke_table_arguments(base, "--total_epsilon", "5")
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", name), *args], capture_output=True, text=True,
                               timeout=600, cwd=ROOT)
    errors = [line for line in completed.stderr.splitlines() if line.strip()]
    assert completed.returncode == 2 and len(errors) == 1, completed.stderr[-2000:]
    assert errors[0].startswith(f"error: {run_dir}/finetune was made with other settings")
    assert "--target_epsilon 4.0 -> 5.0" in errors[0] and "--redo_changed" in errors[0]
    assert json.loads((run_dir / "finetune" / "results.json").read_text())["composed_epsilon"] < 4.01

    output = smoke_table(base, "--total_epsilon", "5", "--redo_changed")
    assert output.count("redoing it (--redo_changed)") == 3 and output.count("nothing to do") == 7
    assert (run_dir / "pretrained" / "eval_results.json").stat().st_mtime_ns == pretrained
    results = json.loads((run_dir / "finetune" / "results.json").read_text())
    assert 4.9 <= results["composed_epsilon"] <= 5.0
    # the old fine-tuned model was deleted, and nothing derived from it is left: its release stays in the history as
    # superseded; the classifier and the new one are counted
    entries = json.loads((run_dir / "ledger.json").read_text())["entries"]
    assert [e["stage"] for e in entries] == ["domain_classifier", "finetune", "finetune"]
    assert entries[2]["run_id"] == json.loads((run_dir / "finetune" / "privacy.json").read_text())["run_id"]
    from common.dp import ledger
    assert ledger.counted_flags(str(run_dir)) == [True, False, True]


@pytest.mark.slow
def test_force_reruns_and_until_stops(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "sentences").mkdir(parents=True)
    (run_dir / "sentences" / "stats.json").write_text("{}")  # a stale "complete" output
    (run_dir / "classifier_data").mkdir()
    ledgers = [run_dir / "ledger.json", run_dir / "baselines" / "random" / "ledger.json"]
    ledgers[1].parent.mkdir(parents=True)
    for ledger in ledgers:
        ledger.write_text('{"entries": [{"stage": "finetune", "run_id": "released before"}]}')
    output = pipeline("--preset", "smoke", "--run_dir", str(run_dir), "--force", "--until", "1")
    assert "stopping after stage 1" in output
    assert json.loads((run_dir / "sentences" / "stats.json").read_text())["sentences"] > 1000
    assert not (run_dir / "classifier_data").exists()
    # what was released stays recorded: --force never makes a ledger smaller
    assert all("released before" in ledger.read_text() for ledger in ledgers)


@pytest.mark.parametrize("args, message", [
    (["--total_epsilon", "0.8"], "--total_epsilon 0.8 leaves nothing for fine-tuning: the domain classifier alone "
                                 "spends 1"),
    (["--total_epsilon", "four"], "--total_epsilon must be a positive number, got 'four'"),
    (["--num_tokens", "0"], "--num_tokens must be a positive number, got '0'"),
    (["--seed", "-1"], "--seed takes a non-negative integer, got '-1'"),
    (["--target", "no/such/messages.jsonl"], "--target no/such/messages.jsonl: no such file or directory"),
    (["--pretrain_tokens", "-2"], "--pretrain_tokens must be a positive number, got '-2'"),
    (["--linear_probe"], "--linear_probe needs --task classification"),
])
def test_pipeline_checks_its_numbers_before_any_work(args, message, tmp_path):
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), "--preset", "smoke",
                                "--run_dir", str(tmp_path / "run"), *args], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and message in completed.stderr and not (tmp_path / "run").exists()


def test_audit_gives_both_dp_stages_the_presets_canaries():
    output = pipeline("--preset", "smoke", "--dry_run", "--audit")
    audited = [line for line in output.splitlines() if "--audit_canaries" in line]
    canaries = preset_values("smoke", "AUDIT_CANARIES")[0]
    assert len(audited) == 4 and all(f"--audit_canaries {canaries}" in line for line in audited)
    assert [line.split()[2] for line in audited] == ["data_selection/train_domain_classifier.py"] + [
        "dp_finetuning/dp_finetune.py"] * 3
    assert "--audit_canaries" not in pipeline("--preset", "smoke", "--dry_run")


def test_sender_level_is_one_flag_away():
    output = pipeline("--preset", "demo", "--privacy_unit", "sender", "--dry_run")
    commands = [line for line in output.splitlines() if line.startswith("+ python")]
    dp_and_data = [c for c in commands if "build_classifier_data" in c or "train_domain_classifier" in c
                   or "dp_finetune" in c]
    assert len(dp_and_data) == 5 and all("--privacy_unit sender" in c for c in dp_and_data)
    # every message of the training senders: the preset's per-message subsample is dropped
    assert not any("--train_fraction" in c for c in dp_and_data)
    assert all("runs/demo_lm_sender/" in c for c in commands)
    assert all("--target_unit_column sender" in c for c in commands if "pretrain_gpt2" in c)
    assert "--privacy_unit" not in pipeline("--preset", "demo", "--dry_run")
    custom = pipeline("--preset", "smoke", "--privacy_unit", "sender", "--unit_column", "author", "--dry_run")
    assert "--unit_column author" in custom and "--target_unit_column author" in custom


@pytest.mark.parametrize("args, message", [
    (["--privacy_unit", "person"], "--privacy_unit takes 'example' or 'sender', got 'person'"),
    (["--unit_column", "author"], "--unit_column needs --privacy_unit sender"),
])
def test_bad_privacy_units_are_refused(args, message):
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), *args, "--dry_run"],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and message in completed.stderr


@pytest.mark.slow
def test_smoke_data_stages_per_sender(smoke_run, tmp_path):
    base, _ = smoke_run
    pipeline("--preset", "smoke", "--privacy_unit", "sender", "--until", "3", "--run_dir", str(tmp_path / "run"),
             "--sentences_dir", str(base / "runs" / "sentences"))
    report = json.loads((tmp_path / "run" / "domain_classifier" / "classifier" / "privacy.json").read_text())
    assert (report["privacy_unit"], report["unit_column"]) == ("sender", "sender")
    assert "one private sender" in report["adjacency"] and report["num_units"] > report["private_units"] > 100


def test_unknown_preset_is_refused():
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), "--preset", "huge"],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and "unknown preset 'huge'" in completed.stderr


def test_classification_is_one_flag_away():
    output = pipeline("--task", "classification", "--preset", "smoke", "--dry_run")
    assert "--target demo" in output and "--task lm" not in output and "runs/smoke_classification/" in output
    assert "--task lm" in pipeline("--preset", "smoke", "--dry_run")
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), "--preset", "paper",
                                "--dry_run"], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and "needs --target" in completed.stderr


def preset_values(preset, name):
    """A preset's array or variable as bash sees it (scripts/presets/<preset>.sh): what the pipeline must pass on,
    whatever a user edited there."""
    completed = subprocess.run(["bash", "-c", f'source scripts/presets/{preset}.sh; printf "%s\\0" "${{{name}[@]}}"'],
                               capture_output=True, text=True, cwd=ROOT, check=True)
    return completed.stdout.split("\0")[:-1]


def test_the_cpu_preset_is_classification_with_its_length_of_pre_training():
    length, = preset_values("cpu", "PRESET_PRETRAIN_TOKENS")
    output = pipeline("--preset", "cpu", "--dry_run")
    pretrainings = re.findall(r"^\+ python pretraining/pretrain_gpt2.py .*$", output, flags=re.M)
    assert len(pretrainings) == 2 and all(f"--max_train_tokens {length} " in line for line in pretrainings)
    assert "--target demo" in output and "--task lm" not in output and "runs/cpu_classification/" in output
    assert "--max_train_tokens 8 " in pipeline("--preset", "cpu", "--pretrain_tokens", "8", "--dry_run")
    assert "--task lm" in pipeline("--preset", "cpu", "--task", "lm", "--dry_run")
    table = script("reproduce_table.sh", "--preset", "cpu", "--seeds", "0", "--dry_run")
    assert "-> runs/table_cpu_classification/micro_0.1_seed0" in table and "--task lm" not in table


def test_the_ceiling_overrides_the_dp_recipe_with_its_own_flags():
    """The demo preset's classification: DP runs take FINETUNE_CLASSIFICATION, --non_private's ceilings the same
    with CEILING_CLASSIFICATION's flags on top (later flags win), whatever the preset file says."""
    from dp_finetuning import dp_finetune
    dp_recipe = dp_finetune.parse_args(["--model_name_or_path", "m", "--output_dir", "o"]
                                       + preset_values("demo", "FINETUNE_CLASSIFICATION"))
    ceiling = dp_finetune.parse_args(["--model_name_or_path", "m", "--output_dir", "o"]
                                     + preset_values("demo", "FINETUNE_CLASSIFICATION")
                                     + preset_values("demo", "CEILING_CLASSIFICATION"))
    output = pipeline("--preset", "demo", "--task", "classification", "--non_private", "--dry_run")
    finetunings = [dp_finetune.parse_args(line.split()[3:]) for line in output.splitlines()
                   if line.startswith("+ python dp_finetuning/dp_finetune.py")]
    assert len(finetunings) == 6 and sum(args.noise_multiplier == 0 for args in finetunings) == 3
    recipe_flags = ("freeze", "pooling", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "num_train_epochs", "max_length")
    for args in finetunings:
        expected = ceiling if args.noise_multiplier == 0 else dp_recipe
        assert all(getattr(args, flag) == getattr(expected, flag) for flag in recipe_flags)
        if args.noise_multiplier != 0:
            assert args.target_epsilon == 4


def test_a_learning_curve_is_one_run_per_length_and_seed_with_the_probe():
    output = script("reproduce_table.sh", "--task", "classification", "--preset", "smoke", "--seeds", "0 1",
                    "--pretrain_tokens", "0.01 0.04", "--linear_probe", "--runs_dir", "runs/curve", "--dry_run")
    run_dirs = re.findall(r"^=== .* -> (\S+)$", output, flags=re.M)
    assert run_dirs == [f"runs/curve/nano_0.2_{tokens}Mtok_seed{seed}"
                        for tokens in ("0.01", "0.04") for seed in (0, 1)]
    pretrainings = re.findall(r"^\+ python pretraining/pretrain_gpt2.py .*$", output, flags=re.M)
    assert len(pretrainings) == 8 and all("--max_train_tokens 0.0" in line for line in pretrainings)
    assert sum("--max_train_tokens 0.04" in line for line in pretrainings) == 4
    probes = re.findall(r"^\+ python dp_finetuning/linear_probe.py .*$", output, flags=re.M)
    assert len(probes) == 12 and sum("--random_init" in line for line in probes) == 4


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--seeds", "0 one"], "--seeds takes integers, got 'one'"),
    (["--epochs", "3"], "unknown argument '--epochs'"),
])
def test_reproduce_table_refuses_bad_arguments(args, message):
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce_table.sh"), *args],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and message in completed.stderr

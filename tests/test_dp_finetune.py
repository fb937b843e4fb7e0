import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast

from common import data
from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.models import GPT2MeanPooledClassifier, load_finetuning_model
from common.stage import DataError, run_stage
from dp_finetuning import dp_finetune, linear_probe
from dp_finetuning.tasks import accuracy, classification_parts
from pretraining import pretrain_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD, BAD = "a wonderful moving film", "a dull tedious mess"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    Dataset.from_dict({"text": [f"{GOOD} number {i} . {BAD} again ." for i in range(300)]}).save_to_disk(
        str(root / "data"))
    pretrain_gpt2.main(["--dataset_path", str(root / "data"), "--output_dir", str(root / "model"),
                        "--model_size", "nano", "--vocab_size", "200", "--block_size", "32",
                        "--per_device_train_batch_size", "8", "--max_train_steps", "5"])
    return root / "model"


@pytest.fixture
def target(tmp_path):
    for name, count in (("train", 80), ("validation", 20), ("test", 20)):
        rows = [{"sentence": f"{GOOD if i % 2 else BAD} {i}", "label": i % 2} for i in range(count)]
        (tmp_path / "target").mkdir(exist_ok=True)
        (tmp_path / "target" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "target"


def finetune_argv(model, target, output, *extra):
    return ["--model_name_or_path", str(model), "--target", str(target), "--output_dir", str(output),
            "--noise_multiplier", "0.5", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
            "--learning_rate", "5e-3", "--num_train_epochs", "4", *extra]


def test_finetune_writes_results_with_the_composed_epsilon(tmp_path, pretrained, target):
    ledger.record(tmp_path / "run", "domain_classifier", "c", Mechanism(1.0, 0.01, 100), 1e-3, "target")
    dp_finetune.main(finetune_argv(pretrained, target, tmp_path / "run" / "finetune"))
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    assert len(results["val_accuracy_per_epoch"]) == 4 and 0 <= results["test_accuracy"] <= 1
    assert results["test_accuracy"] >= 0.75  # the words give the label away
    assert results["val_majority_share"] == results["test_majority_share"] == 0.5
    assert data.majority_share([1, 1, 0]) == 2 / 3 and data.majority_share([0, 0, 0, 1]) == 0.75
    assert data.majority_share([-1, -1]) is None
    assert results["ledger_stages"] == ["domain_classifier", "finetune"]
    assert results["composed_epsilon"] > results["epsilon"] > 0
    assert (tmp_path / "run" / "finetune" / "privacy.json").exists()


def test_stage_six_audited_from_the_command_line(tmp_path, pretrained, target):
    """--audit_canaries: audit.json beside privacy.json at the stage's own epsilon; the model and the mechanism are
    those of the same run without canaries (the same q, steps and noise multiplier)."""
    dp_finetune.main(finetune_argv(pretrained, target, tmp_path / "run" / "finetune", "--audit_canaries", "40"))
    release = tmp_path / "run" / "finetune"
    audit = json.loads((release / "audit.json").read_text())
    privacy = json.loads((release / "privacy.json").read_text())
    assert audit["canaries"] == 40 and audit["accountant_epsilon"] == privacy["epsilon"]["epsilon"]
    assert 0 <= audit["epsilon_lower_bound"] <= audit["accountant_epsilon"] and audit["delta"] == privacy["delta"]
    assert privacy["sample_rate"] == 16 / 80 and privacy["noise_multiplier"] == 0.5
    assert not os.path.exists(str(release) + ".private")  # the canaries' state went with the private state


@pytest.mark.slow
def test_random_init_and_freezing(tmp_path, pretrained, target):
    model, _ = load_finetuning_model(str(pretrained), "classification", freeze="body")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"}
    trained, _ = load_finetuning_model(str(pretrained), "classification")
    fresh, _ = load_finetuning_model(str(pretrained), "classification", random_init=True)
    assert not fresh.transformer.wte.weight.equal(trained.transformer.wte.weight)
    dp_finetune.main(finetune_argv(pretrained, target, tmp_path / "lora", "--lora_r", "2", "--num_train_epochs", "1"))
    assert (tmp_path / "lora" / "results.json").exists()


def test_mean_pooling_reads_the_mean_over_each_sentence_and_its_gradients_are_exact(tmp_path, pretrained):
    """Padded batch against each sentence alone: the logits are the stock model's final hidden states averaged
    over the sentence, times the head; the clipped per-example gradients are torch.func's, one example at a time."""
    from transformers import GPT2ForSequenceClassification

    from common.dp.per_example_grads import PerExampleGradients
    from tests.oracle import classification_loss_per_example, norms_and_clipped_sum, per_example_grads
    model, tokenizer = load_finetuning_model(str(pretrained), "classification", pooling="mean", freeze="embeddings")
    assert type(model) is GPT2MeanPooledClassifier
    model.eval()
    examples = [{"sentence": s, "label": i % 2} for i, s in enumerate(
        [GOOD, f"{BAD} 7", "dull", f"{GOOD} 12 . {BAD}"])]
    collate, _, _, _ = classification_parts(tokenizer, 32, Dataset.from_list(examples), {})
    batch = collate(examples)
    assert batch["attention_mask"].sum(1).unique().numel() >= 3  # sentences padded differently
    with pytest.raises(ValueError, match="labels"):  # never a silently ignored argument
        model(input_ids=batch["input_ids"], labels=batch["labels"])

    stock = GPT2ForSequenceClassification(model.config).eval()
    stock.load_state_dict(model.state_dict())
    with torch.no_grad():
        pooled = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, example in zip(pooled, examples):
            alone = collate([example])
            hidden = stock(input_ids=alone["input_ids"], output_hidden_states=True).hidden_states[-1]
            assert torch.allclose(row, hidden[0].mean(0) @ stock.score.weight.T, atol=1e-5)

    engine = PerExampleGradients(model, max_grad_norm=0.05)
    engine.backward(torch.nn.functional.cross_entropy(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"],
        reduction="none"))
    grads = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    for example in examples:
        for name, g in per_example_grads(model, collate([example]), classification_loss_per_example).items():
            grads[name].append(g[0])
    _, clipped_sum = norms_and_clipped_sum({n: torch.stack(g) for n, g in grads.items()}, 0.05)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad.double(), clipped_sum[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_mean_pooled_release_is_evaluated_as_trained(tmp_path, pretrained, target):
    dp_finetune.main(finetune_argv(pretrained, target, tmp_path / "run" / "pooled", "--pooling", "mean",
                                   "--freeze", "body", "--learning_rate", "3e-2"))
    results = json.loads((tmp_path / "run" / "pooled" / "results.json").read_text())
    config = json.loads((tmp_path / "run" / "pooled" / "config.json").read_text())
    assert results["pooling"] == "mean" and config["architectures"] == ["GPT2MeanPooledClassifier"]
    release = GPT2MeanPooledClassifier.from_pretrained(tmp_path / "run" / "pooled").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "run" / "pooled")
    test = data.load_target_task(str(target))["test"]
    assert accuracy(release, tokenizer, test, 128) == results["test_accuracy"]


def test_bad_inputs_fail_before_any_work(tmp_path, pretrained, target):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        dp_finetune.main(finetune_argv(tmp_path / "empty", target, tmp_path / "a"))
    (target / "train.jsonl").write_text(json.dumps({"sentence": "x", "label": 3}) + "\n")
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        dp_finetune.main(finetune_argv(pretrained, target, tmp_path / "b"))
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_reference_command_maps_its_positional_arguments(tmp_path, pretrained):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "target").mkdir()
    for name, count in (("train", 2100), ("validation", 20), ("test", 20)):
        rows = [{"sentence": f"{GOOD if i % 2 else BAD} {i}", "label": i % 2} for i in range(count)]
        (tmp_path / "target" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    environment = dict(os.environ, TARGET=str(tmp_path / "target"), OUTPUT_DIR=str(tmp_path / "run" / "finetune"))
    completed = subprocess.run(["bash", "scripts/train_sst2.sh", str(pretrained), "1.4", "1", "32", "64", "1e-3", "30",
                                "0", "--max_train_steps", "1", "--max_length", "16"],
                               capture_output=True, text=True, cwd=root, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    privacy = json.loads((tmp_path / "run" / "finetune" / "privacy.json").read_text())
    assert privacy["noise_multiplier"] == 1.4 and privacy["max_grad_norm"] == 1.0 and privacy["steps"] == 1
    assert privacy["expected_logical_batch_size"] == 32 * 64 and privacy["sample_rate"] == pytest.approx(2048 / 2100)
    assert json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())["seed"] == 0


def test_a_model_that_depends_on_an_uncounted_release_is_refused(tmp_path, pretrained, target):
    """The no-pre-training baseline must not take a tokenizer chosen by the DP classifier unless its ledger counts
    it."""
    selective = tmp_path / "selective_model"
    shutil.copytree(pretrained, selective)
    classifier = {"stage": "domain_classifier", "run_id": "c0ffee", "private_data": str(target), "ledger": "elsewhere"}
    ledger.write_releases(selective, [classifier])
    for extra in ((), ("--random_init",)):
        with pytest.raises(DataError, match="does not hold: domain_classifier c0ffee"):
            dp_finetune.main(finetune_argv(selective, target, tmp_path / "scratch" / "finetune", *extra))
    assert not (tmp_path / "scratch" / "finetune").exists()
    # counted in the run's ledger: accepted, and the results name both releases
    ledger.record(tmp_path / "run", "domain_classifier", "c0ffee", Mechanism(1.0, 0.01, 100), 1e-3,
                  str(target))
    dp_finetune.main(finetune_argv(selective, target, tmp_path / "run" / "finetune", "--random_init",
                                   "--num_train_epochs", "1"))
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    assert results["dp_releases"] == ["domain_classifier", "finetune"]
    released = ledger.read_releases(tmp_path / "run" / "finetune")
    assert [r["run_id"] for r in released][0] == "c0ffee"
    assert not (tmp_path / "run" / "finetune.private").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "privacy.json"} <= set(
        os.listdir(tmp_path / "run" / "finetune"))


@pytest.mark.slow
def test_seeds_into_one_run_directory_compose_at_one_delta(tmp_path, pretrained, target):
    ledger.record(tmp_path / "run", "domain_classifier", "c", Mechanism(1.0, 0.01, 100), 1e-4, str(target))
    results = []
    for seed in (0, 1, 2):
        dp_finetune.main(finetune_argv(pretrained, target, tmp_path / "run" / f"finetune_seed{seed}",
                                       "--seed", str(seed),
                                       "--num_train_epochs", "1"))
        results.append(json.loads((tmp_path / "run" / f"finetune_seed{seed}" / "results.json").read_text()))
    entries = ledger.load_entries(tmp_path / "run")
    assert [e["stage"] for e in entries] == ["domain_classifier", "finetune", "finetune", "finetune"]
    alone = compute_epsilons([Mechanism.from_dict(entries[1])], 1e-4)["epsilon"]
    composed, delta = ledger.composed_epsilon(tmp_path / "run")
    assert delta == 1e-4 and results[-1]["delta"] == 1e-4  # the smallest delta, not the stage's 1/(10 n)
    assert results[-1]["stage_delta"] == pytest.approx(1 / 800)
    assert results[-1]["composed_epsilon"] == pytest.approx(composed["epsilon"])
    finetunes_only = compute_epsilons([Mechanism.from_dict(e) for e in entries[1:]], 1e-4)["epsilon"]
    assert alone < finetunes_only < 3 * alone
    assert results[0]["composed_epsilon"] < results[1]["composed_epsilon"] < results[2]["composed_epsilon"]


def test_logistic_regression_reaches_the_regularised_optimum():
    """At the minimum of a strictly convex loss the gradient vanishes: the fit must get there."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator, dtype=torch.float64)
    labels = (features @ torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0], dtype=torch.float64)
              + 0.5 * torch.randn(200, generator=generator, dtype=torch.float64) > 0).double()
    weights, bias = linear_probe.fit_logistic_regression(features, labels, l2=0.01)
    weights.requires_grad_(True), bias.requires_grad_(True)
    linear_probe.regularised_loss(features, labels, weights, bias, 0.01).backward()
    assert weights.grad.abs().max() < 1e-6 and bias.grad.abs() < 1e-6
    separable_labels = (features[:, 0] > 0).long()
    assert linear_probe.probe(features, separable_labels, features, separable_labels, 1e-6) == 1.0
    assert linear_probe.probe(features, separable_labels, features, 1 - separable_labels, 1e-6) == 0.0


def test_linear_probe_end_to_end(tmp_path, pretrained, target):
    output = tmp_path / "probe"
    linear_probe.main(["--model_name_or_path", str(pretrained), "--target", str(target), "--output_dir", str(output)])
    results = json.loads((output / "linear_probe.json").read_text())
    assert results["private"] is False and results["train_examples"] == 80 and results["validation_examples"] == 20
    # the label is a whole word of the sentence: mean-pooled features of a pre-trained model separate it
    assert results["val_accuracy_mean_pooled"] >= 0.9 and results["val_majority_share"] == 0.5
    assert 0 <= results["val_accuracy_last_token"] <= 1
    linear_probe.main(["--model_name_or_path", str(pretrained), "--target", str(target), "--output_dir",
                       str(tmp_path / "random"), "--random_init"])
    assert json.loads((tmp_path / "random" / "linear_probe.json").read_text())["random_init"] is True
    with pytest.raises(DataError, match="--l2 must be non-negative"):
        linear_probe.main(["--model_name_or_path", str(pretrained), "--target", str(target), "--output_dir",
                           str(tmp_path / "bad"), "--l2", "-1"])


def test_gradient_snr_matches_brute_force_per_example_gradients(tmp_path, pretrained, target, capsys):
    """Each group's signal is the norm of the mean of the per-example gradients clipped jointly (torch.func, one
    example at a time); its noise is noise_multiplier * C * sqrt(d) / B."""
    from dp_finetuning import gradient_snr
    from tests.oracle import classification_loss_per_example, norms_and_clipped_sum, per_example_grads
    argv = ["--model_name_or_path", str(pretrained), "--target", str(target), "--max_length", "16", "--num_examples",
            "12", "--noise_multiplier", "2", "--logical_batch_size", "8", "--max_grad_norm", "0.5",
            "--per_device_batch_size", "5", "--freeze", "embeddings"]
    gradient_snr.main(argv)
    printed = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
               if line.startswith("| ") and not line.startswith("| parameters")}

    model, tokenizer = load_finetuning_model(str(pretrained), "classification", freeze="embeddings")
    model.eval()
    task = data.load_target_task(str(target))
    examples = task["train"].shuffle(seed=0).select(range(12))
    collate, _, _, _ = classification_parts(tokenizer, 16, examples, task)
    grads = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    for example in examples:  # alone: no padding, nothing shared
        for name, g in per_example_grads(model, collate([example]), classification_loss_per_example).items():
            grads[name].append(g[0])
    _, clipped_sum = norms_and_clipped_sum({n: torch.stack(g) for n, g in grads.items()}, 0.5)
    assert not any(name.startswith("transformer.wte") for name in clipped_sum)
    expected = {}
    for name, total in clipped_sum.items():
        group = gradient_snr.parameter_group(name)
        count, square = expected.get(group, (0, 0.0))
        expected[group] = count + total.numel(), square + float((total / 12).pow(2).sum())
    expected["all"] = sum(c for c, _ in expected.values()), sum(s for _, s in expected.values())
    assert set(printed) == set(expected) == {"block 0", "block 1", "final LayerNorm and head", "all"}
    for group, (count, square) in expected.items():
        shown_count, signal, noise, _ = printed[group]
        assert int(shown_count.replace(",", "")) == count
        assert float(signal) == pytest.approx(square ** 0.5, rel=2e-3, abs=1e-4)
        assert float(noise) == pytest.approx(2 * 0.5 * count ** 0.5 / 8, rel=2e-3)


@pytest.mark.slow
def test_recipe_search_runs_each_point_once_and_counts_the_classifier(tmp_path, pretrained, target):
    """Two grids sharing a point make two trials, best first by validation accuracy; each trial's ledger holds the
    classifier the model depends on; a rerun skips finished trials; the search's epsilon composes both trials
    with the classifier once."""
    from scripts import tune_finetuning
    model = tmp_path / "model"
    shutil.copytree(pretrained, model)
    classifier = Mechanism(1.0, 0.01, 100)
    ledger.record(tmp_path / "run", "domain_classifier", "c1", classifier, 1e-3, str(target))
    ledger.write_releases(model, [{"stage": "domain_classifier", "run_id": "c1", "private_data": str(target),
                                           "ledger": str(tmp_path / "run")}])
    argv = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "search"),
            "--grid", "learning_rate=5e-3", "--grid", "learning_rate=2e-2,5e-3",
            "--", "--target", str(target), "--noise_multiplier", "0.5",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2", "--num_train_epochs", "2"]
    run_stage(tune_finetuning.main, argv)
    with open(tmp_path / "search" / "tuning.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["trial"] for r in rows) == ["learning_rate-2e-2", "learning_rate-5e-3"]
    assert float(rows[0]["val_accuracy"]) >= float(rows[1]["val_accuracy"])
    trials = []
    for row in rows:
        results = json.loads((tmp_path / "search" / row["trial"] / "finetune" / "results.json").read_text())
        privacy = json.loads((tmp_path / "search" / row["trial"] / "finetune" / "privacy.json").read_text())
        assert results["ledger_stages"] == ["domain_classifier", "finetune"]
        trial = Mechanism(0.5, privacy["sample_rate"], privacy["steps"])
        expected = compute_epsilons([classifier, trial], results["delta"])["epsilon"]
        assert float(row["epsilon"]) == pytest.approx(expected)
        assert float(row["best_val_accuracy"]) >= float(row["val_accuracy"]) and int(row["best_epoch"]) in (1, 2)
        trials.append(trial)
    markdown = (tmp_path / "search" / "tuning.md").read_text()
    together = compute_epsilons([classifier, *trials], results["delta"])["epsilon"]
    assert f"epsilon {together:.3f}" in markdown and "test" not in markdown

    first = (tmp_path / "search" / "tuning.md").read_text()
    run_stage(tune_finetuning.main, argv)  # nothing left to run
    assert (tmp_path / "search" / "tuning.md").read_text() == first
    with pytest.raises(SystemExit):  # other shared arguments: not the same trials
        run_stage(tune_finetuning.main, [*argv[:-1], "3"])
    assert (tmp_path / "search" / "tuning.md").read_text() == first


@pytest.mark.parametrize("grid, extra, message", [
    (["learning_rate"], [], "--grid 'learning_rate': expected name=value"),
    (["learning_rate=1e-3", "learning_rate=2e-3"], [], "--grid names a flag twice"),
    (["learning_rate=1e-3"], ["--learning_rate", "3e-3"], "--learning_rate after '--': set by the search itself"),
    (["learning_rate=1e-3"], ["--output_dir", "x"], "--output_dir after '--': set by the search itself"),
])
def test_recipe_search_refuses_a_bad_grid_in_one_line(tmp_path, pretrained, grid, extra, message, capsys):
    from scripts import tune_finetuning
    with pytest.raises(SystemExit) as stopped:
        run_stage(tune_finetuning.main, ["--model_name_or_path", str(pretrained), "--output_dir",
                                         str(tmp_path / "search"), "--grid", *grid, "--", *extra])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not (tmp_path / "search").exists()


@pytest.mark.slow
def test_stage_six_under_two_processes_releases_once(tmp_path, pretrained, target):
    """torchrun with two processes: the stage finishes on both (they leave the process group together) and the
    run's ledger holds one release."""
    from tests.test_dp_training import free_port
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), os.path.join(ROOT, "dp_finetuning", "dp_finetune.py"),
               *finetune_argv(pretrained, target, tmp_path / "run" / "finetune", "--num_train_epochs", "1")]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("dp_finetune.py finished in") == 1
    assert [e["stage"] for e in ledger.load_entries(tmp_path / "run")] == ["finetune"]
    assert json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())["val_accuracy"] >= 0


def test_stage_six_fine_tunes_per_sender(tmp_path, pretrained):
    """--task lm at sender level on a local single-file target split here: split by sender, one epsilon per
    sender, q over senders."""
    rows = [{"text": f"{GOOD if i % 3 else BAD} {i}", "author": f"person {i % 30}"} for i in range(240)]
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model_name_or_path", str(pretrained), "--target", str(tmp_path / "messages.jsonl"), "--task", "lm",
            "--output_dir", str(tmp_path / "run" / "finetune"), "--noise_multiplier", "0.8",
            "--per_device_train_batch_size", "4", "--max_train_steps", "3", "--privacy_unit", "sender",
            "--max_examples_per_unit", "2"]
    with pytest.raises(DataError, match="no column 'sender'"):
        dp_finetune.main(argv)
    dp_finetune.main(argv + ["--unit_column", "author"])
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    report = json.loads((tmp_path / "run" / "finetune" / "privacy.json").read_text())
    task = data.load_target_task(str(tmp_path / "messages.jsonl"), label_column=None, unit_column="author")
    train_senders = set(task["train"]["unit"])
    assert not train_senders & (set(task["validation"]["unit"]) | set(task["test"]["unit"]))
    assert results["privacy_unit"] == report["privacy_unit"] == "sender"
    assert results["train_units"] == report["num_units"] == len(train_senders)
    assert report["sample_rate"] == pytest.approx(4 / len(train_senders))
    assert report["max_examples_per_unit"] == 2
    assert [e["privacy_unit"] for e in ledger.load_entries(str(tmp_path / "run"))] == ["sender"]


@pytest.fixture(scope="module")
def pretrained_with_words(tmp_path_factory):
    """A nano model whose tokenizer holds whole words: 60 made-up words, each frequent enough to be one token."""
    root = tmp_path_factory.mktemp("pretrained_words")
    words = [a + b + c for a, b, c in zip("bdfgklmnprstvz" * 5, "aeiou" * 14, "ktnslrmpgd" * 7)][:60]
    Dataset.from_dict({"text": [" ".join(words[(i + j) % 60] for j in range(12)) + " ." for i in range(400)]}
                      ).save_to_disk(str(root / "data"))
    pretrain_gpt2.main(["--dataset_path", str(root / "data"), "--output_dir", str(root / "model"),
                        "--model_size", "nano", "--vocab_size", "400", "--block_size", "32",
                        "--per_device_train_batch_size", "8", "--max_train_steps", "3"])
    return root / "model"


@pytest.mark.slow
def test_stage_six_black_box_audit(tmp_path, pretrained, pretrained_with_words):
    """--audit_kind black-box: canary messages join the training messages by secret coins, audit.json holds the
    bound and exposures but no canary text, and the secret seed goes with the private training state."""
    rows = [{"text": f"{GOOD if i % 3 else BAD} {i}"} for i in range(200)]
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "run" / "finetune"
    argv = ["--target", str(tmp_path / "messages.jsonl"), "--task", "lm", "--output_dir", str(output),
            "--noise_multiplier", "0.8", "--per_device_train_batch_size", "16", "--max_train_steps", "3",
            "--model_name_or_path", str(pretrained_with_words), "--audit_canaries", "40", "--audit_kind", "black-box"]
    with pytest.raises(DataError, match="--audit_kind black-box with --model_name_or_path .*: the tokenizer has 0 "
                                        "whole-word tokens"):
        dp_finetune.main([*argv[:-6], "--model_name_or_path", str(pretrained), *argv[-4:]])
    assert not (tmp_path / "run" / "finetune.private").exists()  # nothing left behind
    with pytest.raises(DataError, match="--audit_canaries 4000: between 2 and 2 x training examples"):
        dp_finetune.main([*argv[:-4], "--audit_canaries", "4000", "--audit_kind", "black-box"])
    dp_finetune.main(argv)
    found = json.loads((output / "audit.json").read_text())
    assert found["kind"].startswith("black-box") and found["canaries"] == 40 and found["guesses"] <= 40
    assert found["epsilon_lower_bound"] >= 0 and found["accountant_epsilon"] > 0
    assert {"mean_exposure_included", "mean_exposure_excluded"} <= set(found)
    report = json.loads((output / "privacy.json").read_text())
    results = json.loads((output / "results.json").read_text())
    private = len(data.load_target_task(str(tmp_path / "messages.jsonl"), label_column=None)["train"])
    # every canary is in the training set whatever its coin (an excluded one muted): n and q tell nothing of them
    assert results["train_examples"] == report["num_examples"] == private + 40
    assert report["sample_rate"] == pytest.approx(16 / (private + 40))
    assert report["delta"] == pytest.approx(1 / (10 * private))
    assert "40 canary messages in the training set" in found["cost"]
    assert not (tmp_path / "run" / "finetune.private").exists()
    with pytest.raises(DataError, match="--audit_kind black-box: .* use --task lm"):
        dp_finetune.parse_args(["--model_name_or_path", "m", "--output_dir", "o", "--audit_kind", "black-box"])


@pytest.mark.slow
def test_black_box_canaries_per_sender_and_muted_ones_contribute_nothing(tmp_path, pretrained_with_words):
    rows = [{"text": f"{GOOD if i % 3 else BAD} {i}", "sender": f"person {i % 40}"} for i in range(240)]
    (tmp_path / "messages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "run" / "finetune"
    dp_finetune.main(["--model_name_or_path", str(pretrained_with_words), "--target", str(tmp_path / "messages.jsonl"),
                      "--task", "lm", "--output_dir", str(output), "--noise_multiplier", "0.8",
                      "--per_device_train_batch_size", "8", "--max_train_steps", "2", "--privacy_unit", "sender",
                      "--audit_canaries", "20", "--audit_kind", "black-box"])
    report = json.loads((output / "privacy.json").read_text())
    senders = len(set(data.load_target_task(str(tmp_path / "messages.jsonl"), label_column=None,
                                            unit_column="sender")["train"]["unit"]))
    assert report["num_units"] == senders + 20 and report["private_units"] == senders  # each canary its own unit
    assert json.loads((output / "audit.json").read_text())["canaries"] == 20
    # a muted canary (its coin said out) has no label: a zero loss, so a zero gradient
    collate = dp_finetune.muting_excluded_canaries(lambda examples: {"labels": torch.ones(len(examples), 3).long()})
    labels = collate([{"muted": False}, {"muted": True}])["labels"]
    assert labels[0].tolist() == [1, 1, 1] and labels[1].tolist() == [-100] * 3

"""The privacy ledger is append-only: a release stays counted while it or anything derived from it exists, stays in
the history when deleted, and concurrent writers lose nothing."""

import argparse
import json
import multiprocessing
import os

import pytest

from common.data import private_data_id
from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.dp.training import DPTrainer, sequence_classification_losses
from common.stage import StageOutput
from tests.tiny_task import collate, parse_dp_args, tiny_dataset, tiny_model

CLASSIFIER, FINETUNE = Mechanism(2.0, 0.05, 100), Mechanism(1.0, 0.05, 200)


def release(run_dir, name, run_id, mechanism, depends_on=()):
    """A release as the stages write it: the ledger entry, then privacy.json and dp_releases.json in its directory."""
    directory = run_dir / name
    ledger.record(run_dir, name, run_id, mechanism, 1e-5, "target", release=str(directory))
    directory.mkdir(parents=True)
    (directory / "privacy.json").write_text(json.dumps({"run_id": run_id}))
    mine = {"stage": name, "run_id": run_id, "private_data": "target", "ledger": str(run_dir)}
    ledger.write_releases(directory, [*depends_on, mine])
    return mine


def derived(run_dir, name, releases):
    (run_dir / name).mkdir(parents=True)
    ledger.write_releases(run_dir / name, releases)


def epsilon_of(*mechanisms):
    return compute_epsilons(list(mechanisms), 1e-5)["epsilon"]


def test_a_deleted_release_stays_counted_while_an_output_derived_from_it_exists(tmp_path):
    classifier = release(tmp_path, "domain_classifier", "old", CLASSIFIER)
    derived(tmp_path, "selected", [classifier])
    release(tmp_path, "finetune", "tuned", FINETUNE, depends_on=[classifier])
    # --redo_changed on stage 3 alone: its output goes, the selection and the fine-tuned model stay
    stage3 = StageOutput(argparse.Namespace(output_dir=str(tmp_path / "domain_classifier")), "scores")
    stage3.remove()
    release(tmp_path, "domain_classifier", "new", CLASSIFIER)
    assert ledger.composed_epsilon(tmp_path)[0]["epsilon"] == pytest.approx(
        epsilon_of(CLASSIFIER, CLASSIFIER, FINETUNE))
    # the outputs derived from the old classifier are deleted in turn: it is superseded, and still in the history
    for name in ("selected", "finetune"):
        StageOutput(argparse.Namespace(output_dir=str(tmp_path / name)), "x").remove()
    assert [e["run_id"] for e in ledger.load_entries(tmp_path)] == ["old", "tuned", "new"]
    assert ledger.counted_flags(tmp_path) == [False, False, True]
    assert ledger.composed_epsilon(tmp_path)[0]["epsilon"] == pytest.approx(epsilon_of(CLASSIFIER))


def test_a_release_being_written_counts(tmp_path):
    ledger.record(tmp_path, "finetune", "writing", FINETUNE, 1e-5, "target", release=str(tmp_path / "ft"))
    assert ledger.counted_flags(tmp_path) == [False]
    (tmp_path / "ft").mkdir()  # the release directory exists and names no other run yet
    assert ledger.counted_flags(tmp_path) == [True]


def write_entries(run_dir, worker, count):
    for i in range(count):
        ledger.record(run_dir, "finetune", f"{worker}-{i}", FINETUNE, 1e-5, "target")


def test_concurrent_writers_keep_every_entry(tmp_path):
    processes = [multiprocessing.get_context("fork").Process(target=write_entries, args=(tmp_path, w, 25))
                 for w in range(8)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    assert all(p.exitcode == 0 for p in processes)
    assert len({e["run_id"] for e in ledger.load_entries(tmp_path)}) == 200


def test_private_data_is_named_by_its_resolved_path(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("sentence\nhello\n")
    monkeypatch.chdir(tmp_path)
    assert private_data_id("./data/x.csv") == private_data_id("data/x.csv") == str((tmp_path / "data" / "x.csv")
                                                                                     .resolve())
    assert private_data_id("chat") == "chat"
    counted = release(tmp_path, "domain_classifier", "c1", CLASSIFIER)
    counted["private_data"] = private_data_id("./data/x.csv")
    with pytest.raises(ValueError, match="does not hold"):
        ledger.check_counted([counted], tmp_path / "elsewhere", private_data_id("data/x.csv"))


def test_the_run_directory_composes_every_ledger_on_the_same_data(tmp_path):
    from scripts.summarize_runs import run_directory_composition
    classifier = release(tmp_path, "domain_classifier", "c", CLASSIFIER)
    release(tmp_path, "finetune", "f1", FINETUNE, depends_on=[classifier])
    release(tmp_path / "baselines" / "random", "finetune", "f2", FINETUNE)
    ledger.record(tmp_path / "baselines" / "random", "domain_classifier", "c", CLASSIFIER, 1e-5, "target",
                  release=str(tmp_path / "domain_classifier"))  # one release in two ledgers counts once
    line = run_directory_composition(str(tmp_path))
    expected = epsilon_of(CLASSIFIER, FINETUNE, FINETUNE)
    assert line == (f"All 3 DP releases on target in this run directory together (every variant's models seen at "
                    f"once): epsilon {expected:.3f} per example at delta 1e-05.")
    release(tmp_path / "non_private", "finetune", "f0", Mechanism(0.0, 0.05, 200))
    assert run_directory_composition(str(tmp_path)) == (
        f"All 4 DP releases on target in this run directory together (every variant's models seen at once): epsilon "
        f"inf per example at delta 1e-05 (the run holds fine-tunings without noise; the 3 with noise alone: epsilon "
        f"{expected:.3f} at delta 1e-05).")


def test_the_recipe_search_composes_the_trials_of_earlier_grids(tmp_path):
    from scripts.tune_finetuning import search_epsilon
    for trial in ("learning_rate-1e-3", "learning_rate-3e-3"):  # an earlier grid's trial, then this grid's
        release(tmp_path / trial, "finetune", trial, FINETUNE)
    epsilon, _, count = search_epsilon(str(tmp_path))
    assert count == 2 and epsilon == pytest.approx(epsilon_of(FINETUNE, FINETUNE))


def test_an_empty_poisson_draw_is_a_noisy_step(tmp_path):
    args = parse_dp_args(["--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "1",
                          "--noise_multiplier", "1", "--max_train_steps", "30"])
    trainer = DPTrainer(tiny_model(), tiny_dataset(4), collate, sequence_classification_losses, args, stage="test",
                        private_data="tiny")  # q = 1/4: about 9 of 30 draws are empty
    empty = [step for step in range(30) if len(trainer.step_indices(step)) == 0]
    assert empty
    noise_at, privatise = {}, trainer.privatise_gradients

    def privatise_and_keep(step):
        privatise(step)
        noise_at[step] = sum(float(p.grad.norm()) for p in trainer.params)
    trainer.privatise_gradients = privatise_and_keep
    trainer.train()
    assert trainer.step == 30 and all(noise_at[step] > 0 for step in empty)  # noise alone at the empty steps


def test_privacy_report_names_the_unit_and_the_adjacency(tmp_path, capsys):
    args = parse_dp_args(["--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "8",
                          "--noise_multiplier", "1", "--max_train_steps", "2"])
    trainer = DPTrainer(tiny_model(), tiny_dataset(32), collate, sequence_classification_losses, args, stage="test",
                        private_data="tiny")
    trainer.train()
    report = trainer.release(lambda directory: trainer.model.save_pretrained(directory))
    assert report["privacy_unit"] == "example" and report["adjacency"] == "add or remove one private example"
    entry = ledger.load_entries(tmp_path)[0]
    assert (entry["privacy_unit"], entry["adjacency"]) == ("example", report["adjacency"])
    assert "examples=" not in capsys.readouterr().err  # the realised size of a secret draw is never logged
    # the private training state (the seeds) lies beside the release, never in it
    assert os.listdir(tmp_path / "run.private") == ["checkpoint-2"]
    assert "checkpoint-2" not in os.listdir(tmp_path / "run")

"""What a DP run releases must be what its epsilon covers: no DP randomness in a release, exact resume from
private state, one ledger entry per release, shuffle accounting from the loop's own steps."""

import json
import os
import subprocess
import sys

import pytest
import torch

from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.dp.training import DPTrainer, private_state_dir, sequence_classification_losses
from common.stage import DataError
from tests.tiny_task import collate, parse_dp_args, tiny_dataset, tiny_model

NEIGHBOURS = {"D": tiny_dataset(64), "D minus one example": tiny_dataset(64)[1:]}


def trainer_on(tmp_path, dataset, name, *extra):
    argv = ["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "8", "--noise_multiplier", "1",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", "--max_train_steps", "3", "--seed", "7",
            *extra]
    return DPTrainer(tiny_model(), dataset, collate, sequence_classification_losses, parse_dp_args(argv),
                     stage="test", private_data="tiny")


def train_and_release(trainer):
    trainer.train()
    trainer.release(lambda directory: trainer.model.save_pretrained(directory))
    trainer.discard_training_state()
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def released_bytes(directory):
    contents = {}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                contents[os.path.relpath(os.path.join(root, name), directory)] = handle.read()
    return contents


def test_a_release_holds_no_dp_randomness_and_cannot_be_replayed(tmp_path):
    runs = {}
    # the same data and --seed twice (a replay), and the neighbouring data once, in both modes
    for mode, data_name, attempt in (("secret", "D", 1), ("secret", "D", 2), ("deterministic", "D", 1),
                                     ("deterministic", "D", 2), ("deterministic", "D minus one example", 1)):
        dataset = NEIGHBOURS[data_name]
        trainer = trainer_on(tmp_path, dataset, f"{mode}-{len(dataset)}-{attempt}",
                             *(("--deterministic_dp",) if mode == "deterministic" else ()))
        runs[mode, data_name, attempt] = (train_and_release(trainer), trainer)

    for (mode, data_name, attempt), (_, trainer) in runs.items():
        release = released_bytes(trainer.config.output_dir)
        assert set(release) == {"config.json", "model.safetensors", "privacy.json"}, release.keys()
        assert not os.path.exists(private_state_dir(trainer.config.output_dir))
        for seed in (trainer.sampling_seed, trainer.noise_seed):
            for encoding in (str(seed).encode(), seed.to_bytes(8, "little"), seed.to_bytes(8, "big")):
                assert not any(encoding in content for content in release.values()), (mode, seed)
        privacy = json.loads(release["privacy.json"])
        assert not any("seed" in key for key in privacy) and "7" not in privacy["dp_randomness"]
        assert ("only if" in privacy["dp_randomness"]) == (mode == "deterministic")

    def same(mode, data_a, attempt_a, data_b, attempt_b):
        return torch.equal(runs[mode, data_a, attempt_a][0], runs[mode, data_b, attempt_b][0])
    # secret randomness: re-running on the true data with the same --seed does not reproduce the release
    assert not same("secret", "D", 1, "D", 2)
    assert runs["secret", "D", 1][1].noise_seed != runs["secret", "D", 2][1].noise_seed
    # --deterministic_dp: a replay reproduces the release bitwise on the true data only (why the seed must be secret)
    assert same("deterministic", "D", 1, "D", 2)
    assert not same("deterministic", "D", 1, "D minus one example", 1)
    assert runs["deterministic", "D", 1][1].noise_seed == runs["deterministic", "D", 2][1].noise_seed
    # ... and two runs share noise only if they are the same run on the same data (and then release the same model):
    # the neighbouring data, another setting, noise multiplier or stage derive other seeds
    def seeds(trainer):
        return trainer.sampling_seed, trainer.noise_seed
    same_run = seeds(runs["deterministic", "D", 1][1])
    assert seeds(trainer_on(tmp_path, NEIGHBOURS["D"], "elsewhere", "--deterministic_dp")) == same_run
    others = {seeds(runs["deterministic", "D minus one example", 1][1]),
              seeds(trainer_on(tmp_path, NEIGHBOURS["D"], "x", "--deterministic_dp", "--learning_rate", "0.1")),
              seeds(trainer_on(tmp_path, NEIGHBOURS["D"], "x", "--deterministic_dp", "--noise_multiplier", "2"))}
    other_stage = trainer_on(tmp_path, NEIGHBOURS["D"], "x", "--deterministic_dp")
    other_stage.stage = "another stage"
    assert len(others | {other_stage._new_seeds(), same_run}) == 5


class Killed(Exception):
    pass


def kill_at_step_three(trainer):
    """Train `trainer` until it is killed as it privatises step 3 (after the checkpoint of step 2)."""
    privatise = trainer.privatise_gradients

    def privatise_until_step_three(step):
        if step == 3:
            raise Killed
        privatise(step)
    trainer.privatise_gradients = privatise_until_step_three
    with pytest.raises(Killed):
        trainer.train()


def test_a_killed_run_resumes_from_its_private_state_with_one_ledger_entry(tmp_path):
    common = ("--max_train_steps", "5", "--checkpointing_steps", "2")
    uninterrupted = train_and_release(trainer_on(tmp_path, tiny_dataset(), "full", "--deterministic_dp", *common))

    for mode in (("--deterministic_dp",), ()):
        name = f"killed{len(mode)}"
        killed = trainer_on(tmp_path, tiny_dataset(), name, *mode, *common)
        kill_at_step_three(killed)
        assert os.listdir(private_state_dir(str(tmp_path / name))) == ["checkpoint-2"]
        assert not (tmp_path / name).exists()  # the private state is beside the release, never in it
        resumed = trainer_on(tmp_path, tiny_dataset(), name, *mode, *common, "--resume_from_checkpoint", "latest")
        assert resumed.step == 2 and resumed.run_id == killed.run_id
        assert (resumed.sampling_seed, resumed.noise_seed) == (killed.sampling_seed, killed.noise_seed)
        resumed.train()
        resumed.release(lambda directory: None)
        # killed again after the release but before the private state was deleted: the rerun finishes the same run
        again = trainer_on(tmp_path, tiny_dataset(), name, *mode, *common, "--resume_from_checkpoint", "latest")
        assert again.step == 5
        final = train_and_release(again)
        if mode:
            assert torch.equal(final, uninterrupted)
        entries = [e for e in ledger.load_entries(tmp_path) if e["release"].endswith(name)]
        assert len(entries) == 1 and entries[0]["steps"] == 5


def test_shuffle_accounts_every_epoch_an_example_can_join(tmp_path):
    with pytest.warns(UserWarning, match="Poisson"):
        trainer = DPTrainer(tiny_model(), tiny_dataset(100), collate, sequence_classification_losses,
                            parse_dp_args(["--output_dir", str(tmp_path / "run"), "--sampling", "shuffle",
                                           "--per_device_train_batch_size", "30", "--num_train_epochs", "10",
                                           "--noise_multiplier", "1"]), stage="test", private_data="tiny")
    assert trainer.total_steps == 30  # 3 steps per epoch; 10 examples left out of each permutation
    participation = torch.zeros(100)
    for step in range(trainer.total_steps):
        participation[trainer.step_indices(step)] += 1
    assert participation.max() == 10
    assert trainer.mechanism(steps=trainer.total_steps).compositions == 10
    expected = compute_epsilons([Mechanism(1.0, 0.3, 10, "shuffle", steps_per_epoch=1)], 1e-5)
    assert compute_epsilons([trainer.mechanism(steps=30)], 1e-5) == pytest.approx(expected)


def test_the_ledger_command_prints_the_figure_of_the_composition(tmp_path):
    ledger.record(tmp_path, "domain_classifier", "a", Mechanism(1.0, 0.01, 300), 1e-5, "target")
    ledger.record(tmp_path, "finetune", "b", Mechanism(1.2, 0.03, 200), 3e-5, "target")
    completed = subprocess.run([sys.executable, "-m", "common.dp.ledger", str(tmp_path)],
                               capture_output=True, text=True, check=True)
    composed, delta = ledger.composed_epsilon(tmp_path)
    assert delta == 1e-5
    expected = ("composed epsilon per example of the 2 counted releases at delta=1e-05: "
            f"epsilon {composed['epsilon']:.3f}")
    assert expected in completed.stdout


def test_an_audited_run_resumes_with_its_canary_scores_and_refuses_other_canaries(tmp_path):
    common = ("--max_train_steps", "5", "--checkpointing_steps", "2", "--deterministic_dp", "--audit_canaries", "40")
    uninterrupted = trainer_on(tmp_path, tiny_dataset(), "full", *common)
    uninterrupted.train()
    kill_at_step_three(trainer_on(tmp_path, tiny_dataset(), "killed", *common))
    with pytest.raises(DataError, match="belongs to another run: audit_canaries 40 != 0"):
        trainer_on(tmp_path, tiny_dataset(), "killed", *common[:-2], "--resume_from_checkpoint", "latest")
    resumed = trainer_on(tmp_path, tiny_dataset(), "killed", *common, "--resume_from_checkpoint", "latest")
    resumed.train()
    assert torch.equal(resumed.canaries.scores, uninterrupted.canaries.scores)
    assert torch.equal(resumed.canaries.included, uninterrupted.canaries.included)


def test_a_checkpoint_from_before_the_audit_still_resumes_its_run(tmp_path):
    old = trainer_on(tmp_path, tiny_dataset(), "old", "--max_train_steps", "4")
    old.train()
    state_path = os.path.join(private_state_dir(str(tmp_path / "old")), "checkpoint-4", "training_state.pt")
    state = torch.load(state_path, weights_only=True)
    del state["signature"]["audit_canaries"]  # what such a checkpoint holds
    torch.save(state, state_path)
    assert trainer_on(tmp_path, tiny_dataset(), "old", "--max_train_steps", "4", "--resume_from_checkpoint",
                      "latest").step == 4

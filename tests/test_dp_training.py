import json
import os
import subprocess
import sys

import pytest
import torch

from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.dp.training import DPTrainer, sequence_classification_losses
from tests.tiny_task import collate, parse_dp_args, tiny_dataset, tiny_model
from tests.two_nodes import free_port, run_two_nodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_trainer(tmp_path, *extra, dataset_size=64, name="run"):
    argv = ["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", *extra]
    if "--target_epsilon" not in extra and "--noise_multiplier" not in extra:
        argv += ["--noise_multiplier", "1.0"]
    return DPTrainer(tiny_model(), tiny_dataset(dataset_size), collate, sequence_classification_losses,
                     parse_dp_args(argv), stage="test", private_data="tiny")


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_poisson_batch_sizes_are_binomial(tmp_path):
    trainer = make_trainer(tmp_path)
    n, q, steps = trainer.num_examples, trainer.sample_rate, 2000
    draws = [trainer.step_indices(step) for step in range(steps)]
    sizes = torch.tensor([len(d) for d in draws], dtype=torch.float64)
    assert q == 16 / 64
    assert abs(sizes.mean().item() - n * q) < 0.4
    assert abs(sizes.var().item() - n * q * (1 - q)) < 1.5
    inclusion = torch.zeros(n)
    for d in draws:
        inclusion[d] += 1
    assert torch.allclose(inclusion / steps, torch.full((n,), q), atol=0.045)
    assert all(len(set(d.tolist())) == len(d) for d in draws)


def test_shuffle_batches_have_fixed_size_and_cover_each_epoch(tmp_path):
    with pytest.warns(UserWarning, match="Poisson"):
        trainer = make_trainer(tmp_path, "--sampling", "shuffle")
    epoch = torch.cat([trainer.step_indices(step) for step in range(trainer.steps_per_epoch)])
    assert all(len(trainer.step_indices(s)) == 16 for s in range(10))
    assert sorted(epoch.tolist()) == list(range(64))


def test_noise_std_and_mean(tmp_path):
    trainer = make_trainer(tmp_path, "--noise_multiplier", "1.3", "--max_grad_norm", "0.5")
    samples = []
    for step in range(10):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.privatise_gradients(step)  # no backward: an empty draw still gets its noise
        samples.append(torch.cat([p.grad.flatten() for p in trainer.params]) * trainer.logical_batch)
    noise = torch.cat(samples)
    assert noise.numel() > 20000
    assert noise.std().item() == pytest.approx(1.3 * 0.5, rel=0.03)
    assert abs(noise.mean().item()) < 0.03


def test_training_learns_and_reports_privacy(tmp_path):
    trainer = make_trainer(tmp_path, "--noise_multiplier", "0.3", "--num_train_epochs", "6",
                           "--max_grad_norm", "1.0", "--learning_rate", "3e-2")
    data = collate(tiny_dataset(64))

    def accuracy(model):
        return (model(input_ids=data["input_ids"]).logits.argmax(-1) == data["labels"]).float().mean().item()
    trainer.eval_fn = lambda model: {"accuracy": accuracy(model)}
    trainer.train()
    report = trainer.release(lambda directory: None)
    assert trainer.history[-1]["accuracy"] >= 0.8
    assert report["steps"] == trainer.total_steps == 24
    with open(tmp_path / "run" / "privacy.json") as handle:
        written = json.load(handle)
    expected = compute_epsilons([Mechanism(0.3, 0.25, 24)], 1 / 640)
    assert written["epsilon"] == pytest.approx(expected)
    assert written["delta"] == pytest.approx(1 / 640) and written["sampling"] == "poisson"
    assert [e["stage"] for e in ledger.load_entries(tmp_path)] == ["test"]


def test_length_ordered_micro_batches_give_the_same_training(tmp_path):
    lengths = torch.randint(1, 100, (64,), generator=torch.Generator().manual_seed(1))
    plain = make_trainer(tmp_path, "--max_train_steps", "3", "--deterministic_dp", name="plain")
    ordered = make_trainer(tmp_path, "--max_train_steps", "3", "--deterministic_dp", name="ordered")
    ordered.lengths = lengths
    seen = []
    ordered.collate_fn = lambda examples: seen.append(examples) or collate(examples)
    plain.train()
    ordered.train()
    assert torch.allclose(flat_params(ordered.model), flat_params(plain.model), atol=1e-6)
    first_step = sorted(ordered.step_indices(0).tolist(), key=lambda i: (lengths[i], i))
    drawn = [e for chunk in seen for e in chunk][:len(first_step)]
    dataset = tiny_dataset(64)
    assert [e["input_ids"].tolist() for e in drawn] == [dataset[i]["input_ids"].tolist() for i in first_step]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    make_trainer(tmp_path, "--max_train_steps", "2").train()
    with pytest.raises(ValueError, match="another run: noise_multiplier 1.0 != 2.0"):
        make_trainer(tmp_path, "--max_train_steps", "2", "--noise_multiplier", "2.0", "--resume_from_checkpoint",
                     str(tmp_path / "run.private" / "checkpoint-2"), name="other")


def test_target_epsilon_calibrates_the_noise(tmp_path):
    trainer = make_trainer(tmp_path, "--target_epsilon", "3", "--max_train_steps", "50")
    epsilon = compute_epsilons([trainer.mechanism(steps=50)], trainer.delta)["prv"]
    assert 2.97 <= epsilon <= 3.0


@pytest.mark.parametrize("argv, message", [
    (["--max_grad_norm", "0"], "--max_grad_norm"),
    (["--noise_multiplier", "-1"], "--noise_multiplier"),
    (["--delta", "0.5"], "--delta"),
    (["--target_epsilon", "0", "--noise_multiplier", "1"], "exactly one"),
    (["--target_epsilon", "-2"], "--target_epsilon"),
    (["--per_device_train_batch_size", "64"], "larger than the dataset"),
])
def test_bad_arguments_fail_before_training(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, *argv)
    assert not os.path.exists(tmp_path / "run")


def run_worker(tmp_path, processes, mode, name, dp_argv):
    result = tmp_path / f"{name}.pt"
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                     str(free_port())]
    command = launcher + [os.path.join(ROOT, "tests", "distributed_dp_worker.py"), mode, str(result),
                          "--output_dir", str(tmp_path / name), *dp_argv]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(result)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """Same seed, same logical batch: the same examples, so without noise the same update."""
    common = ["--noise_multiplier", "0", "--max_train_steps", "3", "--max_grad_norm", "0.1",
              "--learning_rate", "1e-2", "--deterministic_dp"]
    one = run_worker(tmp_path, 1, "train", "one", common + ["--per_device_train_batch_size", "8"])
    two = run_worker(tmp_path, 2, "train", "two", common + ["--per_device_train_batch_size", "4"])
    assert not torch.equal(one, flat_params(tiny_model()))
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path):
    """Two machines of one process each (simulated over loopback) take the same DP steps as one process."""
    common = ["--noise_multiplier", "0", "--max_train_steps", "2", "--max_grad_norm", "0.1",
              "--learning_rate", "1e-2", "--deterministic_dp"]
    one = run_worker(tmp_path, 1, "train", "one", common + ["--per_device_train_batch_size", "8"])
    result = tmp_path / "two.pt"
    run_two_nodes(os.path.join(ROOT, "tests", "distributed_dp_worker.py"), "train", str(result), "--output_dir",
                  str(tmp_path / "two"), *common, "--per_device_train_batch_size", "4")
    two = torch.load(result)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_add_the_noise_once(tmp_path):
    noise = run_worker(tmp_path, 2, "noise", "noise", ["--noise_multiplier", "1.5", "--max_grad_norm", "2",
                                                        "--per_device_train_batch_size", "4"])
    assert noise.std().item() == pytest.approx(1.5 * 2, rel=0.03)


@pytest.mark.slow
def test_two_processes_share_the_secret_seeds(tmp_path):
    seeds = run_worker(tmp_path, 2, "seeds", "seeds", ["--noise_multiplier", "1", "--per_device_train_batch_size", "4"])
    assert seeds[0] == seeds[1] and seeds[0][0] != seeds[0][1]


def test_target_epsilon_for_the_whole_run(tmp_path):
    ledger.record(tmp_path, "domain_classifier", "classifier-run", Mechanism(2.0, 0.05, 100), 1 / 640, "tiny")
    trainer = make_trainer(tmp_path, "--target_epsilon", "3", "--target_epsilon_scope", "run",
                           "--max_train_steps", "20")
    trainer.train()
    trainer.release(lambda directory: None)
    composed, _ = ledger.composed_epsilon(tmp_path, trainer.delta)
    assert 2.97 <= composed["epsilon"] <= 3.0
    assert [e["stage"] for e in ledger.load_entries(tmp_path)] == ["domain_classifier", "test"]

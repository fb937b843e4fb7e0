"""The DP loop at sender level (--privacy_unit sender): sampling over senders, whole senders per micro-batch, at
most --max_examples_per_unit examples each, accounting over senders, neighbours differing by one sender."""

import pytest
import torch

from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.dp.training import DPTrainer, sequence_classification_losses
from common.stage import DataError
from tests.tiny_task import collate, parse_dp_args, tiny_dataset, tiny_model

SIZES = [1, 5, 2, 9, 3, 1, 7, 4, 2, 6, 3, 8, 1, 4, 4]  # examples of each sender, 60 in all
SENDERS = [f"sender {unit}" for unit, size in enumerate(SIZES) for _ in range(size)]


def make_trainer(tmp_path, *extra, dataset=None, units=SENDERS, name="run", private_data="tiny"):
    argv = ["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--privacy_unit", "sender", "--max_examples_per_unit", "3", *extra]
    if "--noise_multiplier" not in extra and "--target_epsilon" not in extra:
        argv += ["--noise_multiplier", "1.0"]
    dataset = tiny_dataset(len(units)) if dataset is None else dataset
    return DPTrainer(tiny_model(), dataset, collate, sequence_classification_losses, parse_dp_args(argv),
                     stage="test", private_data=private_data, units=units)


def test_sampling_rate_and_epsilon_count_senders_not_examples(tmp_path):
    trainer = make_trainer(tmp_path, "--max_train_steps", "7")
    assert trainer.num_units == 15 and trainer.num_examples == 60
    assert trainer.sample_rate == 4 / 15
    assert trainer.delta == pytest.approx(1 / 150)
    trainer.step = 7
    report = trainer.privacy_report()
    assert report["privacy_unit"] == "sender" and "one private sender" in report["adjacency"]
    assert report["sample_rate"] == 4 / 15 and report["num_units"] == 15
    expected = compute_epsilons([Mechanism(1.0, 4 / 15, 7)], 1 / 150)["epsilon"]
    assert report["epsilon"]["epsilon"] == pytest.approx(expected)


def test_each_draw_takes_whole_senders_and_at_most_the_limit_of_their_examples(tmp_path):
    trainer = make_trainer(tmp_path)
    members = {}
    for position, sender in enumerate(SENDERS):
        members.setdefault(sender, set()).add(position)
    steps, sender_counts, example_counts = 3000, torch.zeros(15), torch.zeros(60)
    for step in range(steps):
        for group in trainer.step_indices(step):
            senders = {SENDERS[i] for i in group.tolist()}
            assert len(senders) == 1 and len(group) == min(3, len(members[senders.pop()]))
            assert len(set(group.tolist())) == len(group)
            sender_counts[int(SENDERS[int(group[0])].split()[1])] += 1
            example_counts[group] += 1
    assert torch.allclose(sender_counts / steps, torch.full((15,), 4 / 15), atol=0.03)
    # a sender with more than 3 examples: each of them in 3 of every size draws of that sender
    for sender, positions in members.items():
        share = min(1.0, 3 / len(positions)) * 4 / 15
        assert torch.allclose(example_counts[sorted(positions)] / steps, torch.full((len(positions),), share),
                              atol=0.035), sender


def clipped_sum(trainer, step):
    trainer.optimizer.zero_grad(set_to_none=True)
    draw = trainer.step_indices(step)
    if draw:
        trainer.accumulate_clipped_sum(draw)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in trainer.params])


def test_removing_one_sender_moves_each_clipped_sum_by_at_most_the_clip_norm(tmp_path):
    """The same secret seeds on D and on D less its last sender (all 4 of their examples): every other sender's
    draw is the same, and the clipped sums differ by at most C at every step, by about C when that sender is in."""
    dataset = tiny_dataset(60)
    full = make_trainer(tmp_path, "--max_grad_norm", "0.05", dataset=dataset, name="full")
    less = make_trainer(tmp_path, "--max_grad_norm", "0.05", dataset=dataset[:56], units=SENDERS[:56], name="less")
    less.sampling_seed = full.sampling_seed
    less.sample_rate = full.sample_rate  # q as run (docs/privacy.md: n itself is outside the guarantee)
    moved = []
    for step in range(25):
        difference = (clipped_sum(full, step) - clipped_sum(less, step)).norm().item()
        in_full = {SENDERS[int(g[0])] for g in full.step_indices(step)}
        assert {SENDERS[int(g[0])] for g in less.step_indices(step)} == in_full - {"sender 14"}
        assert difference <= 0.05 * (1 + 1e-4)
        moved.append(difference > 0.05 * 0.99)
        assert moved[-1] == ("sender 14" in in_full)
    assert any(moved)


def test_micro_batches_hold_whole_senders(tmp_path):
    """The clipped sum of a step does not depend on how many senders a micro-batch holds."""
    one = make_trainer(tmp_path, "--max_grad_norm", "0.05", "--per_device_train_batch_size", "1", name="one")
    many = make_trainer(tmp_path, "--max_grad_norm", "0.05", "--per_device_train_batch_size", "4",
                        "--gradient_accumulation_steps", "1", name="many")
    many.sampling_seed = one.sampling_seed
    one.sample_rate = many.sample_rate = 0.5
    for step in range(3):
        torch.testing.assert_close(clipped_sum(one, step), clipped_sum(many, step), rtol=1e-5, atol=1e-7)


def test_training_at_sender_level_releases_an_epsilon_per_sender(tmp_path):
    trainer = make_trainer(tmp_path, "--max_train_steps", "3")
    trainer.train()
    report = trainer.release(lambda directory: None)
    assert report["privacy_unit"] == "sender"
    assert [e["privacy_unit"] for e in ledger.load_entries(str(tmp_path))] == ["sender"]
    # an epsilon per example on the same private data would not compose with it
    with pytest.raises(DataError, match="--privacy_unit example: .* per sender"):
        DPTrainer(tiny_model(), tiny_dataset(60), collate, sequence_classification_losses,
                  parse_dp_args(["--output_dir", str(tmp_path / "other"), "--noise_multiplier", "1",
                                 "--per_device_train_batch_size", "4"]), stage="test", private_data="tiny")


def test_one_sender_for_every_example_is_refused(tmp_path):
    with pytest.raises(DataError, match="every training example belongs to one sender"):
        make_trainer(tmp_path, units=["one"] * 60)

"""The DP loop at sender level (--privacy_unit sender): sampling over senders, whole senders per micro-batch, at
most --max_examples_per_unit examples each, accounting over senders, neighbours differing by one sender."""

import collections
import json

import pytest
import torch
from datasets import Dataset

from common import demo_data
from common.data import load_target_task
from common.dp import ledger
from common.dp.accounting import Mechanism, compute_epsilons
from common.dp.training import DPTrainer, sequence_classification_losses
from common.stage import DataError
from data_selection import build_classifier_data, train_domain_classifier
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


# --- the data stages at sender level -------------------------------------------------------------

def write_sender_target(directory, rows):
    """A local target directory: train.jsonl with (sender, text) rows, and held-out validation text."""
    directory.mkdir()
    (directory / "train.jsonl").write_text("".join(json.dumps({"sentence": t, "sender": s}) + "\n" for s, t in rows))
    (directory / "validation.jsonl").write_text("".join(json.dumps({"sentence": f"held out {i}", "sender": "h"}) + "\n"
                                                        for i in range(5)))
    return directory


@pytest.fixture(scope="module")
def public_sentences(tmp_path_factory):
    path = tmp_path_factory.mktemp("public") / "sentences"
    Dataset.from_dict({"text": [f"public sentence number {i}" for i in range(120)], "source": ["p"] * 120,
                       "doc_id": [f"p/{i}" for i in range(120)]}).save_to_disk(str(path))
    (path / "stats.json").write_text("{}")
    return path


def test_stage2_on_neighbouring_targets_differs_by_one_senders_records(tmp_path, public_sentences):
    rows = [(f"s{i % 6}", f"message {i}") for i in range(40)] + [("s1", "hello"), ("s2", "hello"), ("s2", "hello")]
    outputs = {}
    for name, target_rows in (("D", rows), ("D minus s2", [r for r in rows if r[0] != "s2"])):
        out = tmp_path / f"cls {name}"
        build_classifier_data.main(["--sentences_dir", str(public_sentences), "--target",
                                    str(write_sender_target(tmp_path / f"target {name}", target_rows)),
                                    "--num_negatives", "50", "--od_data_size", "1", "--output_dir", str(out),
                                    "--privacy_unit", "sender"])
        outputs[name] = collections.Counter(zip(*(Dataset.load_from_disk(str(out / "train"))[c]
                                                  for c in ("sentence", "label", "unit"))))
    difference = (outputs["D"] - outputs["D minus s2"]) + (outputs["D minus s2"] - outputs["D"])
    assert {unit for _, _, unit in difference.elements()} == {"s2"}
    # a text repeated by two senders stays with both; a sender's own repeat is dropped
    assert outputs["D"][("hello", 1, "s1")] == outputs["D"][("hello", 1, "s2")] == 1
    assert sum(1 for _, label, unit in outputs["D"].elements() if label == 0 and unit is None) == 50


def test_stage3_trains_per_sender_and_refuses_another_unit(tmp_path, public_sentences):
    target = write_sender_target(tmp_path / "target", [(f"s{i % 9}", f"message {i}") for i in range(60)])
    build_classifier_data.main(["--sentences_dir", str(public_sentences), "--target", str(target), "--num_negatives",
                                "60", "--od_data_size", "1", "--output_dir", str(tmp_path / "data"),
                                "--privacy_unit", "sender"])
    argv = ["--data_dir", str(tmp_path / "data"), "--sentences_dir", str(public_sentences), "--num_buckets", "64",
            "--embedding_dim", "8", "--noise_multiplier", "1", "--per_device_train_batch_size", "8",
            "--max_train_steps", "2", "--output_dir", str(tmp_path / "classifier")]
    with pytest.raises(DataError, match="--privacy_unit example: .* built per sender"):
        train_domain_classifier.main(argv)
    train_domain_classifier.main(argv + ["--privacy_unit", "sender"])
    with open(tmp_path / "classifier" / "classifier" / "privacy.json") as handle:
        report = json.load(handle)
    # 9 senders and 60 public negatives, each its own unit; delta from the senders alone
    assert (report["privacy_unit"], report["num_units"], report["private_units"]) == ("sender", 69, 9)
    assert report["sample_rate"] == pytest.approx(8 / 69) and report["delta"] == pytest.approx(1 / 90)


def test_chat_split_by_sender_keeps_each_sender_in_one_split_and_moves_no_other(monkeypatch):
    def conversations(drop_sender=None):
        return json.dumps({f"conv{c}": {"messages": [[{"text": f"message {c}-{t}", "sender": f"s{(c + t) % 40}"}]
                                                     for t in range(4) if f"s{(c + t) % 40}" != drop_sender]}
                           for c in range(300)}).encode()

    def task(**drop):
        monkeypatch.setattr(demo_data, "read_from_wheel", lambda *args: conversations(**drop))
        return load_target_task("chat", label_column=None, unit_column="sender")

    full = task()
    split_of_sender = {}
    for name, split in full.items():
        for sender in split["unit"]:
            assert split_of_sender.setdefault(sender, name) == name
    assert len(set(split_of_sender.values())) == 3
    less = task(drop_sender="s7")
    for name in full:
        kept = [(t, u) for t, u in zip(full[name]["sentence"], full[name]["unit"]) if u != "s7"]
        assert list(zip(less[name]["sentence"], less[name]["unit"])) == kept


@pytest.mark.parametrize("rows, message", [
    ([{"sentence": "hi"}, {"sentence": "yo"}], "no column 'sender'"),
    ([{"sentence": "hi", "sender": "a"}, {"sentence": "yo", "sender": " "}], "row 2 has no sender in column 'sender'"),
])
def test_a_missing_or_empty_sender_is_one_line_naming_the_file(tmp_path, rows, message):
    path = tmp_path / "target.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=f"{path}.*{message}"):
        load_target_task(str(path), label_column=None, unit_column="sender")


def test_the_demo_target_has_no_senders():
    with pytest.raises(DataError, match="--unit_column sender: --target demo has no such column"):
        load_target_task("demo", label_column=None, unit_column="sender")


def test_a_target_with_a_sender_in_two_of_its_own_splits_is_refused(tmp_path):
    target = write_sender_target(tmp_path / "target", [("h", "one"), ("s1", "two"), ("s2", "three")])
    with pytest.raises(DataError, match="1 sender.* both the train and the validation split .*'h'"):
        load_target_task(str(target), label_column=None, unit_column="sender")


def test_releases_per_sender_read_from_another_column_do_not_compose(tmp_path):
    ledger.record(str(tmp_path), "finetune", "a", Mechanism(1.0, 0.1, 10), 1e-5, "tiny", privacy_unit="sender",
                  unit_column="author")
    with pytest.raises(ValueError, match=r"per sender \(column author\).*per sender \(column sender\)"):
        ledger.check_unit(str(tmp_path), "tiny", "sender", "sender")
    ledger.check_unit(str(tmp_path), "tiny", "sender", "author")
    ledger.check_unit(str(tmp_path), "other data", "example")


def test_outputs_made_before_the_unit_flags_existed_are_not_changed(tmp_path):
    """A stage output whose signature predates --privacy_unit and its flags is complete for a run per example, and
    changed for a run per sender."""
    from data_selection import split_sentences
    (tmp_path / "corpus.txt").write_text("".join(f"Public sentence {i}.\n" for i in range(30)))
    argv = ["--corpus", str(tmp_path / "corpus.txt"), "--output_dir", str(tmp_path / "sentences"), "--num_proc", "1"]
    split_sentences.main(argv)
    signature_path = tmp_path / "sentences" / "stage_signature.json"
    signature = json.loads(signature_path.read_text())
    del signature["settings"]["target_unit_column"]
    signature_path.write_text(json.dumps(signature))
    split_sentences.main(argv)  # complete: skipped
    with pytest.raises(DataError, match="--target_unit_column \\(unset\\) -> author"):
        split_sentences.main(argv + ["--target_unit_column", "author"])

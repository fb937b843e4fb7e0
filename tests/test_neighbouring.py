"""Every step between the private data and a DP mechanism keeps neighbours neighbours: built on D and on D with one
private example added or removed, the mechanism's input differs by at most that example (add/remove
adjacency). Each test builds the two neighbouring data sets itself."""

import collections
import hashlib
import json

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from common import data, demo_data, splits
from common.dp.training import DPTrainer, sequence_classification_losses
from common.language_modelling import language_modelling_losses
from common.stage import DataError
from data_selection import build_classifier_data
from tests.tiny_task import collate, parse_dp_args, tiny_dataset


def records(dataset, columns):
    return collections.Counter(zip(*(dataset[c] for c in columns)))


def changed(a, b):
    """How many records are in one multiset and not the other."""
    return sum(((a - b) + (b - a)).values())


# --- stage 2 -------------------------------------------------------------------------------------

def write_target(directory, train):
    directory.mkdir()
    (directory / "train.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in train))
    (directory / "validation.jsonl").write_text("".join(json.dumps({"sentence": f"held out review {i}"}) + "\n"
                                                        for i in range(5)))
    return directory


@pytest.fixture(scope="module")
def public_sentences(tmp_path_factory):
    path = tmp_path_factory.mktemp("public") / "sentences"
    Dataset.from_dict({"text": [f"public sentence number {i}" for i in range(120)] + ["a private review 3"],
                       "source": ["p"] * 121, "doc_id": [f"p/{i}" for i in range(121)]}).save_to_disk(str(path))
    (path / "stats.json").write_text("{}")
    return path


@pytest.mark.parametrize("flags", [(), ("--train_fraction", "0.5")])
def test_stage2_on_neighbouring_targets_differs_by_at_most_the_one_example(tmp_path, public_sentences, flags):
    train = [f"a private review {i}" for i in range(60)] + ["a private review 7"]  # one repeated
    outputs = {}
    neighbours = (("D", train), ("D plus one", train + ["one more private review"]),
                  ("D minus one", train[:10] + train[11:]), ("D plus a repeat", train + ["a private review 8"]),
                  ("D plus a held-out text", train + ["Held out review 2!"]))
    validation = {}
    for name, texts in neighbours:
        target = write_target(tmp_path / f"target {name}", texts)
        out = tmp_path / f"cls {name}"
        build_classifier_data.main(["--sentences_dir", str(public_sentences), "--target", str(target),
                                    "--num_negatives", "116", "--od_data_size", "1", "--output_dir", str(out), *flags])
        outputs[name] = Dataset.from_json(str(out / "filter_train_nonewline.json"))
        validation[name] = records(Dataset.from_json(str(out / "filter_val_nonewline.json")), ("sentence", "label"))
    base = records(outputs["D"], ("sentence", "label"))
    for name, _ in neighbours:
        assert changed(base, records(outputs[name], ("sentence", "label"))) <= 1, name
        assert len(outputs[name]) - sum(outputs[name]["label"]) == 116  # whatever the positives
        assert validation[name] == validation["D"], name  # the held-out side never depends on the training split
    assert records(outputs["D plus a repeat"], ("sentence", "label")) == base  # a repeat changes nothing
    assert records(outputs["D plus a held-out text"], ("sentence", "label")) == base  # nor does a held-out text
    # every public sentence is a negative (116 in train, 5 in validation), the copy of a private one too: the
    # negatives never read the private text
    assert ("a private review 3", 0) in base + validation["D"]


def test_stage2_prints_no_count_of_the_private_data(tmp_path, public_sentences, capsys):
    target = write_target(tmp_path / "target", ["same review", "same review", "!!!", "other review"])
    build_classifier_data.main(["--sentences_dir", str(public_sentences), "--target", str(target),
                                "--num_negatives", "10", "--od_data_size", "1", "--output_dir", str(tmp_path / "o")])
    printed = capsys.readouterr().out
    assert "duplicate" not in printed and "positives" not in printed and "removed" not in printed
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["removed"]["duplicate_positives"] == 1 and stats["private_data"].endswith("target")


# --- subsamples and splits -------------------------------------------------------------------------

def test_stable_sample_moves_no_other_record():
    data = Dataset.from_dict({"sentence": [f"message {i}" for i in range(2000)]})
    kept = set(splits.stable_sample(data, 0.1, seed=3)["sentence"])
    for removed in (0, 7, 1999):
        neighbour = data.select([i for i in range(2000) if i != removed])
        assert set(splits.stable_sample(neighbour, 0.1, seed=3)["sentence"]) == kept - {f"message {removed}"}
    assert 150 < len(kept) < 250
    assert set(splits.stable_sample(data, 0.1, seed=4)["sentence"]) != kept  # the seed changes the sample


def split_of_each(task):
    return {text: name for name, split in task.items() for text in split["sentence"]}


def test_single_file_target_split_moves_no_other_record(tmp_path):
    texts = [f"review number {i}" for i in range(400)]
    (tmp_path / "d.csv").write_text("sentence\n" + "\n".join(texts) + "\n")
    (tmp_path / "d_minus.csv").write_text("sentence\n" + "\n".join(texts[:123] + texts[124:]) + "\n")
    full = split_of_each(data.load_target_task(str(tmp_path / "d.csv"), label_column=None))
    neighbour = split_of_each(data.load_target_task(str(tmp_path / "d_minus.csv"), label_column=None))
    del full[texts[123]]
    assert neighbour == full
    assert 20 < sum(name == "test" for name in full.values()) < 60


def test_chat_split_by_conversation_moves_no_other_message(monkeypatch):
    def conversations(drop_message=None, drop_conversation=None):
        data = {}
        for c in range(300):
            if c == drop_conversation:
                continue
            turns = [[{"text": f"message {c}-{t}", "sender": f"s{c % 7}"}] for t in range(4)
                     if (c, t) != drop_message]
            data[f"conv{c}"] = {"messages": turns}
        return json.dumps(data).encode()

    def task(**drop):
        monkeypatch.setattr(demo_data, "read_from_wheel", lambda *args: conversations(**drop))
        return split_of_each(demo_data.chat_target_task(seed=0))

    full = task()
    assert task(drop_message=(5, 2)) == {k: v for k, v in full.items() if k != "message 5-2"}
    assert task(drop_conversation=9) == {k: v for k, v in full.items() if not k.startswith("message 9-")}
    assert {full[f"message 11-{t}"] for t in range(4)} == {full["message 11-0"]}  # a conversation stays together


def test_demo_target_split_moves_no_other_snippet(monkeypatch):
    rows = [{"category": "fresh" if i % 3 else "rotten", "text": f"snippet {i}", "movie_name": "m"} for i in range(900)]
    monkeypatch.setattr(demo_data, "_rotten_tomatoes_rows", lambda cache_dir: rows)
    full = split_of_each(demo_data.demo_target_task())
    monkeypatch.setattr(demo_data, "_rotten_tomatoes_rows", lambda cache_dir: rows[:400] + rows[401:])
    assert split_of_each(demo_data.demo_target_task()) == {k: v for k, v in full.items() if k != "snippet 400"}


# --- randomness that touches per-example gradients -------------------------------------------------

def preset_like_models():
    """GPT-2 for classification and next-word prediction with GPT-2's default dropout of 0.1, in train mode."""
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=2, pad_token_id=0)
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    torch.manual_seed(0)
    return {"classification": (GPT2ForSequenceClassification(config), sequence_classification_losses),
            "lm": (GPT2LMHeadModel(config), language_modelling_losses)}


def lm_collate(examples):
    ids = torch.stack([e["input_ids"] for e in examples])
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("task", ["classification", "lm"])
def test_clipped_sums_of_neighbouring_data_sets_differ_by_at_most_the_clip_norm(tmp_path, task):
    model, loss_fn = preset_like_models()[task]
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = tiny_dataset(16)
    sums = []
    for name, dataset in (("D", data), ("D minus one", data[:3] + data[4:])):
        model.load_state_dict(initial)
        model.train()
        args = parse_dp_args(["--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "8",
                              "--noise_multiplier", "1", "--max_grad_norm", "0.1"])
        trainer = DPTrainer(model, dataset, collate if task == "classification" else lm_collate, loss_fn, args,
                            stage="test", private_data="tiny")
        torch.manual_seed(1234)  # the same public --seed: the same global generator in both runs
        trainer.accumulate_clipped_sum(torch.arange(len(dataset)))
        sums.append(torch.cat([p.grad.flatten() for p in trainer.params]).clone())
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.engine.detach()
    assert (sums[0] - sums[1]).norm() <= 0.1 * (1 + 1e-4)


# --- empty and non-finite examples -----------------------------------------------------------------

@pytest.mark.parametrize("content", ["sentence\nfine review\n\"\"\nanother review\n",
                                     '{"sentence": "fine review"}\n{"sentence": "  "}\n'])
def test_an_empty_text_is_refused_with_its_file_and_row(tmp_path, content):
    path = tmp_path / ("target.csv" if content.startswith("sentence") else "target.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path.name}: row 2 has no text in column 'sentence'"):
        data.load_target_task(str(path), label_column=None)


def test_a_non_finite_loss_stops_the_run_before_any_release(tmp_path):
    def nan_for_one(model, batch):  # a NaN loss for the example of padding only
        losses = sequence_classification_losses(model, batch)
        return torch.where((batch["input_ids"] == 0).all(1), torch.full_like(losses, float("nan")), losses)

    data = tiny_dataset(16)
    data[5] = {**data[5], "input_ids": torch.zeros_like(data[5]["input_ids"])}
    args = parse_dp_args(["--output_dir", str(tmp_path / "run"), "--per_device_train_batch_size", "16",
                          "--noise_multiplier", "1", "--max_train_steps", "1"])
    trainer = DPTrainer(preset_like_models()["classification"][0], data, collate, nan_for_one, args,
                        stage="test", private_data="tiny")
    with pytest.raises(DataError, match="row 5 of the training set give a non-finite loss"):
        trainer.accumulate_clipped_sum(torch.arange(16))
    assert all(p.grad is None for p in trainer.params)


# --- the demo corpus never reads the private training split -----------------------------------------

def test_stage1_excludes_held_out_target_text_only(tmp_path):
    from data_selection import split_sentences
    target = tmp_path / "target"
    target.mkdir()
    for split, text in (("train", "a sentence of the private training split"),
                        ("validation", "a sentence of the validation split"), ("test", "a sentence of the test split")):
        (target / f"{split}.jsonl").write_text(json.dumps({"sentence": text}) + "\n")
    (tmp_path / "corpus.txt").write_text("A sentence of the private training split. A sentence of the test split. "
                                         "A sentence of the validation split. Public text stays.\n")
    split_sentences.main(["--corpus", str(tmp_path / "corpus.txt"), "--exclude_target", str(target),
                          "--output_dir", str(tmp_path / "sentences"), "--num_proc", "1"])
    kept = Dataset.load_from_disk(str(tmp_path / "sentences"))["text"]
    assert kept == ["a sentence of the private training split.", "public text stays."]


def test_a_stage_signature_never_tells_the_size_of_a_private_file(tmp_path):
    import argparse

    from common.stage import StageOutput
    target = tmp_path / "messages.csv"
    signatures = []
    for rows in (40, 41):  # neighbouring private files
        target.write_text("sentence\n" + "".join(f"message {i}\n" for i in range(rows)))
        inputs = StageOutput(argparse.Namespace(output_dir=str(tmp_path / "out"), target=str(target)), "x").inputs
        fingerprint = inputs[f"--target {target}"]
        assert str(target.stat().st_size) not in fingerprint
        signatures.append(fingerprint)
    assert signatures[0] != signatures[1]  # a changed input is still seen as changed
    # keyed: without the user's secret key, the fingerprint of a file of known time cannot be searched over sizes
    status = target.stat()
    unkeyed = {hashlib.sha256(f"{size} {status.st_mtime_ns}".encode()).hexdigest()[:16] for size in range(10_000)}
    assert signatures[1].split()[1] not in unkeyed


def test_stage2_refuses_sentences_that_excluded_another_split_of_its_target(tmp_path):
    from data_selection import split_sentences
    target = tmp_path / "messages.csv"
    target.write_text("sentence\n" + "".join(f"message number {i}\n" for i in range(50)))
    (tmp_path / "corpus.txt").write_text("".join(f"Public sentence {i}.\n" for i in range(50)))
    split_sentences.main(["--corpus", str(tmp_path / "corpus.txt"), "--exclude_target", str(target),
                          "--split_seed", "1", "--output_dir", str(tmp_path / "sentences"), "--num_proc", "1"])
    argv = ["--sentences_dir", str(tmp_path / "sentences"), "--target", str(target), "--num_negatives", "10",
            "--od_data_size", "1"]
    with pytest.raises(DataError, match="--split_seed 0: .* split with --split_seed 1"):
        build_classifier_data.main([*argv, "--output_dir", str(tmp_path / "a")])
    build_classifier_data.main([*argv, "--split_seed", "1", "--output_dir", str(tmp_path / "b")])


def test_stage2_per_sender_refuses_sentences_that_excluded_a_split_by_text(tmp_path):
    """At sender level the target is split by sender: stage 1's exclusion of a split by text would have read
    training text of that split."""
    from data_selection import split_sentences
    target = tmp_path / "messages.csv"
    target.write_text("sentence,sender\n" + "".join(f"message number {i},s{i % 12}\n" for i in range(60)))
    (tmp_path / "corpus.txt").write_text("".join(f"Public sentence {i}.\n" for i in range(50)))
    argv = ["--target", str(target), "--num_negatives", "10", "--od_data_size", "1", "--privacy_unit", "sender"]
    for unit_flags in ([], ["--target_unit_column", "sender"]):
        sentences = tmp_path / f"sentences{len(unit_flags)}"
        split_sentences.main(["--corpus", str(tmp_path / "corpus.txt"), "--exclude_target", str(target), *unit_flags,
                              "--output_dir", str(sentences), "--num_proc", "1"])
        build = [*argv, "--sentences_dir", str(sentences), "--output_dir", str(tmp_path / f"data{len(unit_flags)}")]
        if not unit_flags:
            with pytest.raises(DataError, match="split by text, .* run stage 1 with --target_unit_column sender"):
                build_classifier_data.main(build)
        else:
            build_classifier_data.main(build)

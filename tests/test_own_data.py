"""Your own data through the main entry point: a folder corpus and CSV targets, next-word prediction and
classification, end to end with the smoke preset; bad data stops in one line before stage 1."""

import csv
import json
import os
import random
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOVEL_WORDS = "the ship sailed north across a grey sea while old sailors told stories of storms".split()
MANUAL_WORDS = "press the button then open the valve and check the pressure gauge twice daily".split()
MESSAGE_WORDS = "hey are you coming tonight i will bring snacks see you soon love it thanks".split()


def sentences(rng, words, count):
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))).capitalize() + "." for _ in range(count)]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A corpus folder of two sources (.txt documents and a JSON Lines file), a message CSV and a labelled CSV."""
    base, rng = tmp_path_factory.mktemp("own"), random.Random(0)
    for source, words in (("novels", NOVEL_WORDS), ("manuals", MANUAL_WORDS)):
        (base / "corpus" / source).mkdir(parents=True)
        for document in range(30):
            (base / "corpus" / source / f"{document}.txt").write_text(" ".join(sentences(rng, words, 60)))
    with open(base / "corpus" / "chat_logs.jsonl", "w") as handle:
        for text in sentences(rng, MESSAGE_WORDS + NOVEL_WORDS, 600):
            handle.write(json.dumps({"text": text}) + "\n")
    for name, labelled in (("messages.csv", False), ("reviews.csv", True)):
        with open(base / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"] if labelled else ["text"])
            for i, text in enumerate(sentences(rng, MESSAGE_WORDS, 800)):
                writer.writerow([text, i % 2] if labelled else [text])
    return base


def pipeline(*args):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), "--preset", "smoke", *args],
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("task, target", [("lm", "messages.csv"), ("classification", "reviews.csv")])
def test_own_corpus_folder_and_csv_target_end_to_end(own_data, task, target):
    run_dir = own_data / f"run_{task}"
    completed = pipeline("--task", task, "--corpus", str(own_data / "corpus"), "--target", str(own_data / target),
                         "--run_dir", str(run_dir))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert f"--target {own_data / target}: train " in completed.stdout  # checked before stage 1
    stats = json.loads((run_dir / "sentences" / "stats.json").read_text())
    assert stats["sentences"] > 3000
    report = json.loads((run_dir / "selected" / "selection_report.json").read_text())
    assert set(report["corpus_source_share"]) >= {"novels", "manuals", "chat_logs.jsonl"}
    results = json.loads((run_dir / "finetune" / "results.json").read_text())
    assert results["task"] == task and results["target"] == str(own_data / target)
    assert results["train_examples"] > 600  # the whole training split: the presets' fractions are for their targets
    if task == "lm":
        assert results["test_word_perplexity"] > 1
        pretrained = json.loads((run_dir / "pretrained" / "eval_results.json").read_text())
        assert pretrained["target_validation_word_perplexity"] > 1
    else:
        assert 0 <= results["test_accuracy"] <= 1


@pytest.mark.parametrize("make, flags, message", [
    (lambda base: (base / "body.csv").write_text("body\n" + "a message\n" * 50), ["--target", "{base}/body.csv"],
     "{base}/body.csv: no column 'text' (nor 'sentence') (columns: body); --text_column names the column to read"),
    (lambda base: (base / "empty").mkdir(), ["--target", "{base}/messages.csv", "--corpus", "{base}/empty"],
     "--corpus {base}/empty: a directory with no .txt"),
    (lambda base: None, ["--task", "classification", "--target", "{base}/messages.csv"],
     "no column 'label'"),
    (lambda base: None, ["--target", "{base}/messages.csv", "--corpus", "{base}"],
     "--corpus {base} and --target {base}/messages.csv overlap: the private data would be pre-trained on"),
    (lambda base: None, ["--target", "{base}/messages.csv", "--privacy_unit", "sender"],
     "{base}/messages.csv: no column 'sender' (columns: text); --unit_column names the column"),
])
def test_bad_own_data_stops_in_one_line_before_stage_1(own_data, tmp_path, make, flags, message):
    base = tmp_path
    (base / "messages.csv").write_text((own_data / "messages.csv").read_text())
    make(base)
    completed = pipeline(*[flag.format(base=base) for flag in flags], "--run_dir", str(base / "run"))
    errors = [line for line in completed.stderr.splitlines() if line.strip()]
    assert completed.returncode == 2 and len(errors) == 1 and message.format(base=base) in errors[0], completed.stderr
    assert "== stage 1" not in completed.stdout and not (base / "run").exists()


def test_a_stage_1_output_given_without_a_corpus_is_reused_as_it_is(tmp_path):
    sentences = tmp_path / "my_sentences"
    sentences.mkdir()
    (sentences / "stats.json").write_text("{}")
    (sentences / "stage_signature.json").write_text(json.dumps({"settings": {"corpus": ["my_corpus/"]}}))
    completed = pipeline("--sentences_dir", str(sentences), "--run_dir", str(tmp_path / "run"), "--dry_run")
    assert completed.returncode == 0, completed.stderr
    assert f'reusing {sentences}, stage 1\'s output as it is (made from: "corpus":["my_corpus/"]' in completed.stdout
    assert "split_sentences.py" not in completed.stdout
    assert f"--sentences_dir {sentences} " in completed.stdout  # stage 2 reads it
    checked = pipeline("--sentences_dir", str(sentences), "--corpus", "demo-small", "--run_dir", str(tmp_path / "run"),
                       "--dry_run")
    assert f"split_sentences.py --corpus demo-small --max_documents 800 --output_dir {sentences}" in checked.stdout

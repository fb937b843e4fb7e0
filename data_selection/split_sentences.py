"""Stage 1: split the public corpus into lowercased sentences with NLTK's Punkt.

    python data_selection/split_sentences.py --corpus demo --output_dir runs/demo/sentences
    python data_selection/split_sentences.py --corpus wikipedia bookcorpus --num_proc 32 --output_dir ...

Writes an HF dataset (`text`, `source`, `doc_id`) and `stats.json` into --output_dir.
Documents are processed shard by shard with `datasets.map` (num_proc workers), each
shard saved as it finishes, so the corpus never sits in one Python list and a killed
run resumes at the next unfinished shard.

Punkt: an installed NLTK `punkt_tab` model (plain-text parameters, no pickle) if there is
one, else a model trained on the corpus itself (Punkt is unsupervised), seeded with
common English abbreviations.
"""

import argparse
import math
import os
import shutil
import time

import datasets
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer, PunktTrainer
from tqdm.auto import tqdm

from common.atomic_io import replace_directory, write_json
from common.data import TEXT_COLUMN_HELP, load_public_corpus, load_target_task
from common.demo_data import DEFAULT_CACHE_DIR
from common.splits import add_split_seed_argument, seeded_subset
from common.stage import DataError, StageOutput, add_redo_argument, run_stage
from common.text import remove_punctuation

COMMON_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "inc",
                        "ltd", "co", "corp", "no", "u.s", "u.k", "gen", "gov", "sen", "rep", "lt", "col", "capt",
                        "sgt", "mt", "ft", "jan", "feb", "mar", "apr", "aug", "sept", "oct", "nov", "dec", "a.m",
                        "p.m", "ph.d", "approx", "dept", "est", "fig", "vol", "al")
TRAINING_CHARACTERS = 4_000_000
MAX_SENTENCE_WORDS = 40
EMPTY_SHARD = "EMPTY"


def load_punkt(documents, language="english"):
    """An installed punkt_tab model, else Punkt trained on (a prefix of) `documents`; returns (tokenizer, how)."""
    try:
        from nltk.tokenize import PunktTokenizer
        return PunktTokenizer(language), f"installed punkt_tab/{language}"
    except (LookupError, ImportError):
        pass
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    characters = 0
    for text in documents:
        trainer.train(text, finalize=False)
        characters += len(text)
        if characters >= TRAINING_CHARACTERS:
            break
    trainer.finalize_training()
    parameters = trainer.get_params()
    parameters.abbrev_types.update(COMMON_ABBREVIATIONS)
    return PunktSentenceTokenizer(parameters), f"trained on {characters:,} characters of the corpus"


def split_text(tokenizer, text):
    """Lowercased sentences of one document; line breaks end paragraphs, spaces are collapsed. A "sentence"
    longer than MAX_SENTENCE_WORDS (text without punctuation, such as 20 Newsgroups) is cut into equal pieces."""
    sentences = []
    for paragraph in text.split("\n"):
        if paragraph.strip():
            for sentence in tokenizer.tokenize(paragraph):
                words = sentence.lower().split()
                pieces = math.ceil(len(words) / MAX_SENTENCE_WORDS)
                size = math.ceil(len(words) / max(pieces, 1))
                sentences += [" ".join(words[start:start + size]) for start in range(0, len(words), size)]
    return sentences


def _split_batch(batch, tokenizer, excluded):
    out = {"text": [], "source": [], "doc_id": [], "is_target": []}
    for text, source, doc_id in zip(batch["text"], batch["source"], batch["doc_id"]):
        for sentence in split_text(tokenizer, text):
            out["text"].append(sentence)
            out["source"].append(source)
            out["doc_id"].append(doc_id)
            out["is_target"].append(remove_punctuation(sentence) in excluded)
    return out


HELD_OUT_SPLITS = ("validation", "test")


def target_sentences(spec, cache_dir, split_seed=0, text_column=None, unit_column=None):
    """Every text and sentence of the target task's held-out splits (validation, test), normalised
    (`remove_punctuation`). The training split, the private data of the DP stages, is never read; a target split
    here is split as the DP stages split it (by `unit_column` at sender level)."""
    task = load_target_task(spec, text_column, label_column=None, cache_dir=cache_dir, seed=split_seed,
                            unit_column=unit_column)
    tokenizer = PunktSentenceTokenizer(PunktParameters())
    tokenizer._params.abbrev_types.update(COMMON_ABBREVIATIONS)
    excluded = set()
    for split in (task[name] for name in HELD_OUT_SPLITS if name in task):
        for text in split["sentence"]:
            excluded.add(remove_punctuation(text))
            excluded.update(remove_punctuation(sentence) for sentence in split_text(tokenizer, text))
    excluded.discard("")
    return excluded


def compute_stats(sentences, documents, replaced_bytes, excluded_count, punkt, exclusion):
    per_source = {}
    for source in sorted(set(documents["source"])):
        per_source[source] = {"documents": 0, "sentences": 0, "words": 0}
    for source in documents["source"]:
        per_source[source]["documents"] += 1
    for batch in sentences.iter(batch_size=10_000):
        for source, text in zip(batch["source"], batch["text"]):
            per_source[source]["sentences"] += 1
            per_source[source]["words"] += len(text.split())
    totals = {key: sum(s[key] for s in per_source.values()) for key in ("documents", "sentences", "words")}
    return {**totals, "per_source": per_source, "undecodable_bytes_replaced": replaced_bytes,
            "target_sentences_removed": excluded_count, "excluded_target": exclusion, "punkt": punkt}


def split_corpus(documents, tokenizer, work_dir, num_shards, num_proc, excluded=frozenset()):
    """Split shard by shard into work_dir/shard-i (skipping finished shards); returns the shards."""
    progress = tqdm(total=len(documents), desc="splitting", unit="doc")
    shards, sentences_done, start = [], 0, time.perf_counter()
    for index in range(num_shards):
        shard_dir = os.path.join(work_dir, f"shard-{index:05d}")
        if not os.path.exists(shard_dir):
            shard = documents.shard(num_shards, index, contiguous=True)
            split = shard.map(_split_batch, batched=True, batch_size=200, num_proc=num_proc if num_proc > 1 else None,
                              remove_columns=shard.column_names,
                              fn_kwargs={"tokenizer": tokenizer, "excluded": excluded})
            shutil.rmtree(f"{shard_dir}.tmp", ignore_errors=True)  # left by a run killed while saving
            if len(split):
                split.save_to_disk(f"{shard_dir}.tmp")
            else:  # datasets cannot load an empty saved dataset back
                os.makedirs(f"{shard_dir}.tmp", exist_ok=True)
                open(os.path.join(f"{shard_dir}.tmp", EMPTY_SHARD), "w").close()
            os.replace(f"{shard_dir}.tmp", shard_dir)
        if not os.path.exists(os.path.join(shard_dir, EMPTY_SHARD)):
            shards.append(datasets.load_from_disk(shard_dir))
            sentences_done += len(shards[-1])
        progress.update(math.ceil(len(documents) * (index + 1) / num_shards) - progress.n)
        progress.set_postfix(sentences=sentences_done,
                             sent_per_s=f"{sentences_done / (time.perf_counter() - start):.0f}")
    progress.close()
    return shards


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=["demo"],
                        help="'demo' (about 15M words), 'demo-small' (2.9M), hub names (wikipedia bookcorpus), or "
                             "local files/directories")
    parser.add_argument("--text_column", default=None, help=TEXT_COLUMN_HELP)
    parser.add_argument("--target_text_column", default=None, help="--exclude_target's text column (local files); "
                        "default 'text', else 'sentence'")
    parser.add_argument("--exclude_target", default=None,
                        help="drop public sentences equal, once normalised (lowercase, no punctuation, single "
                             "spaces), to a text or sentence of this target task's validation or test split, so "
                             "that no evaluation text is pre-trained on (default: 'demo' for the demo corpora, "
                             "whose public and target text come from the same package). The training split is "
                             "never read; the held-out splits are outside the DP guarantee anyway")
    add_split_seed_argument(parser)
    parser.add_argument("--target_unit_column", default=None,
                        help="--exclude_target for sender-level DP stages: split a target without splits of its own "
                             "(chat, a single file) by this column, as they do")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    parser.add_argument("--num_shards", type=int, default=None, help="default: one per 20,000 documents")
    parser.add_argument("--max_documents", type=int, default=None,
                        help="keep a seeded random sample of this many documents (quick runs)")
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    add_redo_argument(parser)
    args = parser.parse_args(argv)

    work_dir = f"{args.output_dir.rstrip('/')}.partial"
    output = StageOutput(args, "stats.json", work_dir=work_dir)
    if output.complete():
        return
    documents, replaced = load_public_corpus(args.corpus, args.text_column, args.cache_dir)
    if args.max_documents is not None and args.max_documents < len(documents):
        documents = seeded_subset(documents, args.max_documents, seed=0).flatten_indices()
    exclude = args.exclude_target or ("demo" if args.corpus in (["demo"], ["demo-small"]) else None)
    excluded = (frozenset(target_sentences(exclude, args.cache_dir, args.split_seed, args.target_text_column,
                                           args.target_unit_column)) if exclude else frozenset())
    tokenizer, punkt = load_punkt(documents["text"] if len(documents) < 100_000 else
                                  documents.select(range(100_000))["text"])
    output.claim(work_dir)
    num_shards = args.num_shards or max(1, math.ceil(len(documents) / 20_000))
    shards = split_corpus(documents, tokenizer, work_dir, num_shards, max(1, args.num_proc), excluded)
    if not shards:
        shutil.rmtree(work_dir)
        raise DataError(f"--corpus {' '.join(args.corpus)}: no sentences in the documents")
    sentences = datasets.concatenate_datasets(shards)
    removed = sum(sentences["is_target"])
    sentences = sentences.filter(lambda flags: [not f for f in flags], input_columns="is_target", batched=True,
                                 batch_size=10_000).remove_columns("is_target")
    exclusion = ({"target": exclude, "split_seed": args.split_seed, "unit_column": args.target_unit_column}
                 if exclude else None)
    stats = compute_stats(sentences, documents, replaced, removed, punkt, exclusion)
    final_dir = os.path.join(work_dir, "final")
    sentences.save_to_disk(final_dir)
    output.claim(final_dir)
    write_json(os.path.join(final_dir, "stats.json"), stats)
    replace_directory(final_dir, args.output_dir)
    shutil.rmtree(work_dir)
    print(f"{stats['sentences']:,} sentences, {stats['words']:,} words from {stats['documents']:,} documents "
          f"-> {args.output_dir} (Punkt: {punkt})")


if __name__ == "__main__":
    run_stage(main)

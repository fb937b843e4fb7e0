"""Stage 1 throughput: sentences per second of the sharded, parallel splitter against NLTK's plain
loop (what `nltk.sent_tokenize` does: one Punkt `tokenize` call per document, one process) on the
same documents with the same Punkt model, in the same run.

    python scripts/benchmark_split.py [--corpus demo] [--num_proc 2]
"""

import argparse
import os
import tempfile
import time

from common.data import load_public_corpus
from common.demo_data import DEFAULT_CACHE_DIR
from data_selection.split_sentences import load_punkt, split_corpus


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=["demo"])
    parser.add_argument("--num_proc", type=int, default=os.cpu_count())
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    documents, _ = load_public_corpus(args.corpus, cache_dir=args.cache_dir)
    tokenizer, how = load_punkt(documents["text"])
    texts = list(documents["text"])

    start = time.perf_counter()
    plain = sum(len(tokenizer.tokenize(text)) for text in texts)
    plain_rate = plain / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as work_dir:
        start = time.perf_counter()
        shards = split_corpus(documents, tokenizer, work_dir, num_shards=args.num_shards, num_proc=args.num_proc)
        ours = sum(len(shard) for shard in shards)
        ours_rate = ours / (time.perf_counter() - start)

    print(f"{len(texts):,} documents, Punkt {how}, {os.cpu_count()} cores")
    print("| splitter | sentences | sentences/s | ratio |")
    print("|---|---|---|---|")
    print(f"| plain Punkt loop (sent_tokenize) | {plain:,} | {plain_rate:,.0f} | 1.00x |")
    print(f"| stage 1 (num_proc={args.num_proc}, sharded, saved to disk) | {ours:,} | {ours_rate:,.0f} | "
          f"{ours_rate / plain_rate:.2f}x |")


if __name__ == "__main__":
    main()

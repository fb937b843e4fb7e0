"""Stage 3 scoring throughput (sentences per second) of both backbones, and of the transformer
backbone's length-bucketed scoring against a plain loop over an unsorted, padded DataLoader with
the same model, in the same run.

    python scripts/benchmark_scoring.py [--sentences_dir runs/demo/sentences] [--num_sentences 4000]
"""

import argparse
import time

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from common.demo_data import demo_public_documents
from data_selection.domain_classifier import build_classifier, score_sentences


def sample_sentences(sentences_dir, count, seed=0):
    if sentences_dir:
        sentences = datasets.load_from_disk(sentences_dir)
        picked = np.random.default_rng(seed).choice(len(sentences), size=min(count, len(sentences)), replace=False)
        return list(sentences.select(picked)["text"])
    # no stage 1 output given: sentence-like pieces of the demo corpus
    pieces = [p.strip().lower() for text in demo_public_documents()["text"] for p in text.split(". ") if p.strip()]
    picked = np.random.default_rng(seed).choice(len(pieces), size=min(count, len(pieces)), replace=False)
    return [pieces[i] for i in picked]


@torch.no_grad()
def plain_loop(model, encode, sentences, batch_size):
    loader = DataLoader(sentences, batch_size=batch_size, shuffle=False, collate_fn=list)
    return np.concatenate([torch.softmax(model(**encode(batch)).logits, -1)[:, 1].numpy() for batch in loader])


def rate(function, sentences):
    start = time.perf_counter()
    function(sentences)
    return len(sentences) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences_dir", default=None)
    parser.add_argument("--num_sentences", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    sentences = sample_sentences(args.sentences_dir, args.num_sentences)
    hashed, hashed_encode = build_classifier("hashed")
    transformer, transformer_encode = build_classifier("transformer", "minilm")
    hashed.eval(), transformer.eval()
    hashed_rate = rate(lambda s: score_sentences(hashed, hashed_encode, s, args.batch_size), sentences)
    bucketed_rate = rate(lambda s: score_sentences(transformer, transformer_encode, s, args.batch_size), sentences)
    plain_rate = rate(lambda s: plain_loop(transformer, transformer_encode, s, args.batch_size), sentences)
    print(f"{len(sentences):,} sentences, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print("| scorer | sentences/s | ratio to the plain loop |")
    print("|---|---|---|")
    print(f"| hashed n-gram backbone, length-bucketed | {hashed_rate:,.0f} | |")
    print(f"| MiniLM-L6 + LoRA, plain unsorted padded DataLoader loop | {plain_rate:,.0f} | 1.00x |")
    print(f"| MiniLM-L6 + LoRA, length-bucketed (stage 3) | {bucketed_rate:,.0f} | {bucketed_rate / plain_rate:.2f}x |")


if __name__ == "__main__":
    main()

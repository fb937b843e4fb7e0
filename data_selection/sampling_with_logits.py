"""Stage 4: keep the most target-like public sentences up to a word budget (or random ones).

    python data_selection/sampling_with_logits.py --num_tokens 40 --sentences_dir ... --scores_dir ... \\
        --output_dir runs/demo/selected
    python data_selection/sampling_with_logits.py --num_tokens 40 --random ...

As the reference sampling_with_logits.py: skip sentences under --min_words (6) whitespace
words, take sentences in descending in-domain probability until the budget (millions of
whitespace words; a number below 1 is a fraction of the corpus's words) is passed, shuffle,
and save an HF dataset with `text` (and `source`, `score`). `--random` takes the same budget
of random sentences. Writes selection_report.json and selection_report.png beside it.

Beyond the paper, `--document_weight w` ranks by (1 - w) x the sentence's logit margin + w x
the mean margin of its document's sentences: a sentence inherits some of its document's domain
signal (public data and the released classifier only, so no privacy cost). w = 0, the default,
is the paper's ranking by in-domain probability.
"""

import argparse
import os

import datasets
import numpy as np

from common.atomic_io import atomic_directory, write_json
from common.dp import ledger
from common.stage import DataError, StageOutput, add_redo_argument, run_stage
from data_selection.domain_classifier import load_scores


def word_budget(num_tokens, total_words):
    if not num_tokens > 0:
        raise DataError(f"--num_tokens must be positive, got {num_tokens}")
    return int(num_tokens * total_words) if num_tokens < 1 else int(num_tokens * 1_000_000)


def document_smoothed(logit, doc_ids, weight):
    """(1 - weight) x logit + weight x the mean logit of the same document."""
    if weight == 0:
        return logit
    _, document = np.unique(doc_ids, return_inverse=True)
    document_mean = np.bincount(document, weights=logit) / np.bincount(document)
    return (1 - weight) * logit + weight * document_mean[document]


def select(word_counts, ranking_score, budget, min_words, random_order, seed):
    """Indices of the kept sentences, in selection order, and whether the budget exceeded the corpus."""
    eligible = np.flatnonzero(word_counts >= min_words)
    if random_order:
        order = eligible[np.random.default_rng(seed).permutation(len(eligible))]
    else:
        order = eligible[np.argsort(-ranking_score[eligible], kind="stable")]
    cumulative = np.cumsum(word_counts[order])
    if len(cumulative) == 0 or cumulative[-1] <= budget:
        return order, True
    # keep sentences until the budget is passed: the one that passes it is kept
    return order[:int(np.searchsorted(cumulative, budget, side="left")) + 1], False


def source_shares(sources, word_counts, indices):
    shares = {}
    total = word_counts[indices].sum()
    for source in np.unique(sources):
        mask = sources[indices] == source
        shares[str(source)] = float(word_counts[indices][mask].sum() / total) if total else 0.0
    return shares


def plot_report(path, probability, kept, corpus_shares, selection_shares, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = np.linspace(0, 1, 51)
    left.hist(probability, bins=bins, alpha=0.6, label="all sentences", color="tab:gray")
    left.hist(probability[kept], bins=bins, alpha=0.7, label="selected", color="tab:blue")
    left.set_yscale("log")
    left.set_xlabel("in-domain probability")
    left.set_ylabel("sentences")
    left.legend()
    left.set_title("domain-classifier scores")
    names = sorted(corpus_shares)
    positions = np.arange(len(names))
    right.barh(positions - 0.2, [corpus_shares[n] for n in names], height=0.4, label="corpus", color="tab:gray")
    right.barh(positions + 0.2, [selection_shares.get(n, 0) for n in names], height=0.4, label="selection",
               color="tab:blue")
    right.set_yticks(positions, names)
    right.set_xlabel("share of words")
    right.legend()
    right.set_title("sources")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences_dir", required=True, help="stage 1's output")
    parser.add_argument("--scores_dir", default=None, help="stage 3's scores (not needed with --random)")
    parser.add_argument("--num_tokens", type=float, required=True,
                        help="word budget in millions of whitespace words, or a fraction of the corpus if < 1")
    parser.add_argument("--random", action="store_true", help="random sentences instead of the top-scored")
    parser.add_argument("--min_words", type=int, default=6)
    parser.add_argument("--document_weight", type=float, default=0.0,
                        help="weight of the document's mean score in the ranking (0: the paper's sentence score)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    add_redo_argument(parser)
    args = parser.parse_args(argv)

    output = StageOutput(args, "selection_report.json")
    if output.complete():
        return
    if not os.path.isdir(args.sentences_dir):
        raise DataError(f"--sentences_dir {args.sentences_dir}: no such directory")
    sentences = datasets.load_from_disk(args.sentences_dir)
    texts = sentences["text"]
    word_counts = np.fromiter((len(t.split()) for t in texts), dtype=np.int64, count=len(sentences))
    if not 0 <= args.document_weight <= 1:
        raise DataError(f"--document_weight must be in [0, 1], got {args.document_weight}")
    if args.random:
        probability = ranking = np.full(len(sentences), np.nan, dtype=np.float32)
    elif args.scores_dir is None:
        raise DataError("--scores_dir is required unless --random is given")
    else:
        probability, logit = load_scores(args.scores_dir, len(sentences))
        ranking = document_smoothed(logit.astype(np.float64), np.array(sentences["doc_id"]), args.document_weight)
    budget = word_budget(args.num_tokens, int(word_counts.sum()))
    kept, took_all = select(word_counts, ranking, budget, args.min_words, args.random, args.seed)
    if took_all:
        print(f"the budget ({budget:,} words) is at least the corpus's eligible words: all "
              f"{len(kept):,} eligible sentences are taken")
    shuffled = kept[np.random.default_rng(args.seed + 1).permutation(len(kept))]
    selected = sentences.select(shuffled)
    if not args.random:
        selected = selected.add_column("score", probability[shuffled].tolist())

    sources = np.array(sentences["source"])
    corpus_shares = source_shares(sources, word_counts, np.arange(len(sentences)))
    selection_shares = source_shares(sources, word_counts, kept)
    report = {
        "mode": ("random" if args.random else "top in-domain probability" if args.document_weight == 0 else
                 f"top {1 - args.document_weight:g} x sentence logit margin + {args.document_weight:g} x its "
                 "document's mean logit margin"),
        "budget_words": budget, "selected_words": int(word_counts[kept].sum()), "selected_sentences": len(kept),
        "corpus_words": int(word_counts.sum()), "corpus_sentences": len(sentences), "min_words": args.min_words,
        "document_weight": args.document_weight,
        "budget_exceeds_corpus": bool(took_all), "seed": args.seed,
        "corpus_source_share": corpus_shares, "selection_source_share": selection_shares,
        "share_ratio": {k: selection_shares.get(k, 0) / v for k, v in corpus_shares.items() if v > 0},
    }
    if not args.random:
        report["top_sentences"] = [{"text": texts[i], "probability": float(probability[i])} for i in kept[:10]]
        eligible_by_score = np.flatnonzero(word_counts >= args.min_words)
        bottom = eligible_by_score[np.argsort(ranking[eligible_by_score], kind="stable")[:10]]
        report["bottom_sentences"] = [{"text": texts[i], "probability": float(probability[i])} for i in bottom]

    with atomic_directory(args.output_dir) as tmp:
        selected.save_to_disk(tmp)
        if not args.random:
            plot_report(os.path.join(tmp, "selection_report.png"), probability, kept, corpus_shares, selection_shares,
                        f"{len(kept):,} sentences, {report['selected_words']:,} words selected")
        # the selection depends on the DP classifier's release, the random baseline on none
        ledger.write_releases(tmp, [] if args.random else ledger.read_releases(args.scores_dir))
        output.claim(tmp)
        write_json(os.path.join(tmp, "selection_report.json"), report)
    print(f"{len(kept):,} sentences, {report['selected_words']:,} words -> {args.output_dir}")
    if not args.random:  # a random selection's shares are the corpus's, up to sampling noise
        print("source share of words, corpus -> selection: " + ", ".join(
            f"{k} {corpus_shares[k]:.3f} -> {selection_shares.get(k, 0):.3f}" for k in sorted(corpus_shares)))


if __name__ == "__main__":
    run_stage(main)

"""Check your own data before the pipeline's first stage: the target's splits and columns, and the local parts
of the public corpus, so that a wrong column or an empty folder stops the run in one line before any work.

    python scripts/check_data.py --task lm --target messages.csv --corpus my_corpus/ [--text_column text]

Named data (demo, chat, glue/sst2, wikipedia, bookcorpus) is left to the stages. A corpus path that holds the
target (or lies inside it) is refused: the private data would be pre-trained on without noise. Prints one line
per data set, for the data's owner: the target's split sizes and the corpus's documents per source.
"""

import argparse
import collections
import os

from common.data import (
    HUB_PUBLIC,
    HUB_TARGET,
    TEXT_COLUMN_HELP,
    UNIT_COLUMN_HELP,
    load_public_corpus,
    load_target_task,
)
from common.demo_data import DEFAULT_CACHE_DIR
from common.stage import DataError, run_stage

NAMED_TARGETS = ("demo", "chat", *HUB_TARGET)
NAMED_CORPORA = ("demo", "demo-small", *HUB_PUBLIC)


def refuse_target_in_corpus(target, corpus):
    """The private data must not be pre-trained on: no local corpus path may hold the target or lie inside it."""
    if not os.path.exists(target):
        return
    private = os.path.realpath(target)
    for spec in corpus:
        public = os.path.realpath(spec)
        if os.path.exists(spec) and (os.path.commonpath([private, public]) in (private, public)):
            raise DataError(f"--corpus {spec} and --target {target} overlap: the private data would be pre-trained "
                            "on without noise; keep the target outside the corpus")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("lm", "classification"), default="lm")
    parser.add_argument("--target", required=True)
    parser.add_argument("--corpus", nargs="*", default=[])
    parser.add_argument("--text_column", default=None, help=TEXT_COLUMN_HELP + " (the target's and the corpus's)")
    parser.add_argument("--label_column", default="label", help="classification: the 0/1 labels of local files")
    parser.add_argument("--unit_column", default=None, help=UNIT_COLUMN_HELP + " (checked when given)")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    refuse_target_in_corpus(args.target, args.corpus)
    if args.target not in NAMED_TARGETS:
        label_column = args.label_column if args.task == "classification" else None
        task = load_target_task(args.target, args.text_column, label_column, args.cache_dir, args.split_seed,
                                args.unit_column)
        sizes = ", ".join(f"{name} {len(split):,}" for name, split in task.items())
        senders = f" of {len(set(task['train']['unit'])):,} training senders" if args.unit_column else ""
        print(f"--target {args.target}: {sizes} examples{senders}")
    local = [spec for spec in args.corpus if spec not in NAMED_CORPORA]
    if local:
        corpus, _ = load_public_corpus(local, args.text_column, args.cache_dir)
        per_source = collections.Counter(corpus["source"]).most_common()
        shown = ", ".join(f"{source} {count:,}" for source, count in per_source[:8])
        more = f" and {len(per_source) - 8} more sources" if len(per_source) > 8 else ""
        print(f"--corpus {' '.join(local)}: {len(corpus):,} documents ({shown}{more})")


if __name__ == "__main__":
    run_stage(main, timed=False)

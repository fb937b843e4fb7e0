"""Stable selections of private records: subsamples and splits decided by a keyed hash of each record.

A seeded permutation moves every later record when one is removed; a keyed hash of the record
itself decides its membership whatever else the data set holds, so neighbouring data sets (one
record added or removed) stay neighbours after a subsample or a split (docs/privacy.md).
"""

import hashlib

from datasets import DatasetDict

from common.stage import DataError


def keyed_uniform(key, seed, purpose):
    """A number in [0, 1) from a keyed hash (BLAKE2b) of `key` with `seed` and `purpose`."""
    digest = hashlib.blake2b(str(key).encode(), key=f"{purpose}:{seed}".encode()[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def split_of(key, seed, held_out_fraction):
    value = keyed_uniform(key, seed, "split")
    return "validation" if value < held_out_fraction else "test" if value < 2 * held_out_fraction else "train"


def stable_split(dataset, column, seed, held_out_fraction):
    """DatasetDict train/validation/test: each record's split from a keyed hash of its `column` alone
    (validation and test about `held_out_fraction` each)."""
    names = [split_of(key, seed, held_out_fraction) for key in dataset[column]]
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


SPLIT_SEED_HELP = ("seed of the target's train/validation/test split where the target has none of its own (demo, chat, "
                   "a single local file); fixed by default so that --seed varies the training randomness only, "
                   "over the same test set, as hub tasks' fixed splits do")


def add_split_seed_argument(parser):
    parser.add_argument("--split_seed", type=int, default=0, help=SPLIT_SEED_HELP)


def seeded_subset(dataset, count, seed):
    """A seeded random `count` records of `dataset` (all of it when count is None or not smaller). NOT stable under
    adding or removing a record: for held-out data and non-private diagnostics only, never before a DP mechanism."""
    if count is None or count >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(count))

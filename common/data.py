"""Where the text comes from: hub datasets, local files, and the offline `demo` data (common/demo_data.py).

Public corpus: a `Dataset` of documents with columns `text`, `source`, `doc_id`.
Target task: a `DatasetDict` (train, validation, test) with columns `sentence`, `label`
(labels 0/1; -1 marks an unlabelled test set, as GLUE's), or, for next-word prediction
(no label column asked for), `sentence` alone; at sender level every split also has `unit`, from the
column that names each record's privacy unit (the chat target's `sender`).
"""

import csv
import glob
import io
import json
import os
import re

import datasets
from datasets import Dataset, DatasetDict, load_dataset

from common.demo_data import DEFAULT_CACHE_DIR, chat_target_task, demo_public_documents, demo_target_task
from common.splits import stable_split
from common.stage import DataError
from common.text import decode

# name -> (hub repository, config, text column)
HUB_PUBLIC = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", "text"),
    "bookcorpus": ("bookcorpus/bookcorpus", None, "text"),
}
# name -> (hub repository, config, text column, label column)
HUB_TARGET = {"glue/sst2": ("nyu-mll/glue", "sst2", "sentence", "label")}

UNLABELLED_TARGETS = ("chat",)
CHAT_UNIT_COLUMN = "sender"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
# the text column of local data when no flag names one: `text`, else `sentence` (GLUE's name)
TEXT_COLUMNS = ("text", "sentence")
TEXT_COLUMN_HELP = "the column holding the text in local files; default 'text', else 'sentence'"
UNIT_COLUMN_HELP = ("--privacy_unit sender: the column naming the person who wrote each record (the chat target's: "
                    "'sender'); targets split here are split by it, and a target with its own splits must not "
                    "have one sender in two splits")



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


def load_target_task(spec, text_column=None, label_column="label", cache_dir=DEFAULT_CACHE_DIR, seed=0,
                     unit_column=None):
    """DatasetDict train/validation/test with `sentence` and `label`, labels checked; local data's text is read
    from `text_column` (None: `text`, else `sentence`).

    With label_column=None (next-word prediction, or a stage that only reads the target's text)
    the splits hold `sentence` without labels; the chat target has no labels at all. With `unit_column`
    (sender level) every split keeps a `unit` column read from it, and a target split here (chat, a
    single local file) is split by unit: each unit's split from a keyed hash of the unit alone.
    """
    if spec in UNLABELLED_TARGETS and label_column is not None:
        raise DataError(f"--target {spec}: messages without labels, a next-word prediction target (--task lm)")
    if spec == "demo":
        task = demo_target_task(cache_dir, seed)
    elif spec == "chat":
        if unit_column not in (None, CHAT_UNIT_COLUMN):
            raise DataError(f"--unit_column {unit_column}: the chat target's messages name their writer in column "
                            f"{CHAT_UNIT_COLUMN!r}")
        task = chat_target_task(cache_dir, seed, split_by=unit_column or "conversation")
        return DatasetDict({name: split.rename_column(unit_column, "unit") if unit_column else split
                            for name, split in task.items()})
    elif spec in HUB_TARGET:
        repository, config, text_column, hub_label = HUB_TARGET[spec]
        label_column = hub_label if label_column is not None else None
        task = load_dataset(repository, config)
        task = DatasetDict({name: task[name] for name in ("train", "validation", "test") if name in task})
        for name, split in task.items():
            _refuse_empty_texts(split, text_column, f"--target {spec} ({name} split)")
        task = _rename(task, text_column, label_column, f"--target {spec}", unit_column)
    elif os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "state.json")):
        task = _local_task_directory(spec, text_column, label_column, unit_column)
    elif os.path.exists(spec):
        dataset, _ = load_local(spec, text_column, label_column)
        text_column = text_column_of(dataset.column_names, text_column, spec)
        _refuse_empty_texts(dataset, text_column, spec)
        if unit_column is not None:
            _unit_values(dataset, unit_column, spec)
        task = _rename(stable_split(dataset, unit_column or text_column, seed, 0.1), text_column, label_column, spec,
                       unit_column)
    else:
        raise DataError(f"--target {spec!r}: not 'demo', 'chat', a known hub task ({', '.join(HUB_TARGET)}) or an "
                        "existing file or directory")
    if unit_column is not None and "unit" not in task["train"].column_names:
        raise DataError(f"--unit_column {unit_column}: --target {spec} has no such column (columns: "
                        f"{', '.join(task['train'].column_names)})")
    if unit_column is not None:
        _refuse_senders_in_two_splits(task, spec, unit_column)
    kept = ["sentence"] + (["unit"] if unit_column is not None else [])
    for name in ("train", "validation"):
        if name not in task:
            raise DataError(f"--target {spec}: no {name} split")
        if label_column is None:
            task[name] = task[name].select_columns(kept)
            continue
        bad = set(task[name].unique("label")) - {0, 1}
        if bad:
            raise DataError(f"--target {spec}: {name} labels must be 0 or 1, found {sorted(bad)[:5]}")
    if label_column is None and "test" in task:
        task["test"] = task["test"].select_columns(kept)
    return task


def _local_task_directory(path, text_column, label_column, unit_column=None):
    """A directory saved with DatasetDict.save_to_disk, or holding train.* / validation.* / test.* files."""
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        task = datasets.load_from_disk(path)
        for name, split in task.items():
            where = f"{path} ({name} split)"
            _refuse_empty_texts(split, text_column_of(split.column_names, text_column, where), where)
        return _rename(task, text_column, label_column, path, unit_column)
    splits, files = {}, {}
    for name in ("train", "validation", "test"):
        found = [f for f in sorted(glob.glob(os.path.join(path, f"{name}.*"))) if f.endswith(LOCAL_SUFFIXES)]
        if found:
            splits[name], files[name] = load_local(found[0], text_column, label_column)[0], found[0]
            _refuse_empty_texts(splits[name], text_column_of(splits[name].column_names, text_column, found[0]),
                                found[0])
    if not splits:
        raise DataError(f"--target {path}: no train.*/validation.*/test.* files ({', '.join(LOCAL_SUFFIXES)})")
    return _rename(DatasetDict(splits), text_column, label_column, files, unit_column)


def _refuse_empty_texts(dataset, text_column, where):
    """Stop before training on a missing or blank text: it has no tokens, and a loss over no tokens is NaN."""
    for row, text in enumerate(dataset[text_column]):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: row {row + 1} has no text in column {text_column!r} (found {text!r}); remove "
                            "the row or fill it in")


def _unit_values(split, unit_column, where):
    """The unit of every record of `split`; a missing or blank one stops with its row."""
    if unit_column not in split.column_names:
        raise DataError(f"{where}: no column {unit_column!r} (columns: {', '.join(split.column_names)}); "
                        "--unit_column names the column of each record's sender")
    values = split[unit_column]
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{where}: row {row + 1} has no sender in column {unit_column!r} (found {value!r}); "
                            "fill it in or remove the row (--unit_column)")
    return values


def _refuse_senders_in_two_splits(task, spec, unit_column):
    """A sender with training and held-out records would have their held-out text read outside DP (evaluation,
    stage 1's exclusion): splits of one's own must keep each sender in one split."""
    training = set(task["train"]["unit"])
    for name in ("validation", "test"):
        if name in task:
            shared = training & set(task[name]["unit"])
            if shared:
                raise DataError(f"--target {spec}: {len(shared)} sender(s) in column {unit_column!r} have records in "
                                f"both the train and the {name} split (e.g. {sorted(map(str, shared))[0]!r}); at "
                                "sender level each sender's records must be in one split (give a single file to be "
                                "split by sender, or split yours so)")


def _rename(task, text_column, label_column, origin, unit_column=None):
    """`sentence` (and `label`, unless label_column is None; `unit`, if unit_column is given) from the named
    columns; labels must be integers. `origin` names where the task came from in errors: a string, or one file per
    split."""
    renamed = {}
    for name, split in task.items():
        where = origin[name] if isinstance(origin, dict) else f"{origin} ({name} split)"
        text = text_column_of(split.column_names, text_column, where)
        if label_column is not None and label_column not in split.column_names:
            raise DataError(f"{where}: no column {label_column!r} (columns: {', '.join(split.column_names)}); "
                            "--label_column names the column to read")
        columns = [text] + ([label_column] if label_column is not None else [])
        if unit_column is not None:
            _unit_values(split, unit_column, where)
            columns.append(unit_column)
        if label_column is not None:
            values = split.unique(label_column)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                shown = ", ".join(repr(v) for v in sorted(values, key=str)[:5])
                raise DataError(f"{where}: column {label_column!r} must hold the integer labels 0 and 1, found "
                                f"{shown}")
        split = split.select_columns(columns)
        if text != "sentence":
            split = split.rename_column(text, "sentence")
        if unit_column is not None and unit_column != "unit":
            split = split.rename_column(unit_column, "unit")
        if label_column is None:
            renamed[name] = split
            continue
        if label_column != "label":
            split = split.rename_column(label_column, "label")
        renamed[name] = split
    return DatasetDict(renamed)

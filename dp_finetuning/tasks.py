"""The two fine-tuning tasks as the DP loop needs them: batches, per-example losses, held-out metrics and
lengths, for sequence classification and for next-word prediction (common/language_modelling.py)."""

import torch

from common.dp.training import sequence_classification_losses
from common.language_modelling import (
    collate_messages,
    encode_message,
    evaluate_language_model,
    language_modelling_losses,
)
from common.splits import seeded_subset


@torch.no_grad()
def accuracy(model, tokenizer, split, max_length, batch_size=128):
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(split), batch_size):
        rows = split[start:start + batch_size]
        batch = tokenizer([s.lower() for s in rows["sentence"]], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        predictions = model(**batch).logits.argmax(-1).cpu()
        correct += int((predictions == torch.tensor(rows["label"])).sum())
    return correct / len(split)


def classification_parts(tokenizer, max_length, train_set, task):
    """(collate, per-example losses, evaluate(model, split name), lengths) of sequence classification."""
    def collate(examples):
        # lowercased, as the public text the model was pre-trained on
        batch = tokenizer([e["sentence"].lower() for e in examples], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor([e["label"] for e in examples])}

    def evaluate(model, split):
        if -1 in set(task[split]["label"]):  # an unlabelled test set (GLUE)
            return {"accuracy": None}
        return {"accuracy": accuracy(model, tokenizer, task[split], max_length)}

    lengths = [min(len(ids), max_length) for ids in tokenizer([s.lower() for s in train_set["sentence"]])["input_ids"]]
    return collate, sequence_classification_losses, evaluate, lengths


def language_modelling_parts(tokenizer, max_length, train_set, task, max_eval_samples=None, seed=0):
    """(collate, per-example losses, evaluate(model, split name), lengths) of next-word prediction; held-out splits
    cut to a seeded sample of `max_eval_samples` messages (held-out data: outside the guarantee either way)."""
    held_out = {split: list(seeded_subset(task[split], max_eval_samples, seed)["sentence"])
                for split in ("validation", "test") if split in task}

    def collate(examples):
        return collate_messages([encode_message(tokenizer, e["sentence"], max_length) for e in examples],
                                tokenizer.pad_token_id)

    def evaluate(model, split):
        return evaluate_language_model(model, tokenizer, held_out[split], max_length)

    lengths = [len(encode_message(tokenizer, text, max_length)) for text in train_set["sentence"]]
    return collate, language_modelling_losses, evaluate, lengths

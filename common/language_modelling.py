"""Next-word prediction on private messages: encoding, the per-example loss, and the metrics.

One private example is one message, lowercased as the public text of pre-training, encoded
as EOS + its tokens + EOS (pre-training separated sentences by EOS, so EOS starts a message
and the model also learns where a message ends).

Metrics over every predicted token of a split (the message's tokens and its closing EOS):
  * perplexity: exp(mean next-token cross-entropy), per token of the model's own tokenizer;
  * word perplexity: exp(the same summed cross-entropy / the number of words), where a message of
    w whitespace-delimited words counts w + 1 (its end, the closing EOS, is predicted too). The
    count depends only on the text, so word perplexities of models with different tokenizers
    compare (each pre-training trains its own BPE: per-token figures do not). Messages cut by
    --max_length are left out of it (`cut_messages` says how many);
  * next-token accuracy: share of positions whose argmax is the true next token;
  * next-word accuracy, as the paper reports for Enron: at every word boundary of a message
    (before each whitespace-delimited word but the first), greedy decoding from the true
    prefix must produce exactly the next word: each of its tokens, then a token that starts
    a new word (a byte-level token with a leading space) or EOS. Greedy decoding from the true
    prefix follows the true tokens for as long as it is right, so one teacher-forced forward
    pass per message decides every boundary exactly, and no cap on boundaries is needed.
    Words cut by --max_length are not counted.
"""

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.dp.audit import AuditResult, audit

WORD_START = "\u0120"  # byte-level BPE's mark of a leading space
MIN_CANARY_VOCABULARY = 20  # words: with fewer, two canaries of six words would often be the same message


def encode_message(tokenizer, text, max_length):
    """Token ids EOS + message + EOS, cut to max_length (the closing EOS is dropped when the message is cut)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(text.lower(), add_special_tokens=False)["input_ids"]
    return [eos] + ids[:max_length - 2] + ([eos] if len(ids) <= max_length - 2 else [])


def collate_messages(encoded, pad_token_id):
    """Right-padded batch with labels equal to the ids and -100 at padding (a real EOS keeps its label)."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100)}


def language_modelling_losses(model, batch):
    """Per-example mean next-token cross-entropy; `labels` are the ids with -100 at padding."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    token_losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return token_losses.sum(1) / (targets != -100).sum(1).clamp_min(1)


def word_boundaries(tokens):
    """(start, end) token positions of every word but the first in one encoded message, given as token strings
    with None for EOS (EOS + tokens [+ EOS]); a word ends where the next one starts or at the closing EOS, and a
    word cut off at the end is left out."""
    starts = [position for position in range(2, len(tokens))
              if tokens[position] is not None and tokens[position].startswith(WORD_START)]
    closed = len(tokens) > 1 and tokens[-1] is None  # the closing EOS is there
    ends = starts[1:] + ([len(tokens) - 1] if closed else [])
    return list(zip(starts, ends))


@torch.no_grad()
def evaluate_language_model(model, tokenizer, texts, max_length, batch_size=64):
    """{perplexity, word_perplexity, next_token_accuracy, next_word_accuracy, words, cut_messages} of `model` on
    `texts` (module docstring)."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    ends_word = torch.tensor([token.startswith(WORD_START) for token in vocabulary])
    ends_word[eos] = True
    loss_sum = tokens_seen = tokens_right = words_seen = words_right = 0
    whole_loss_sum = whole_words = cut_messages = 0  # word perplexity: messages not cut by max_length
    encoded = sorted(((encode_message(tokenizer, text, max_length), len(text.split()) + 1) for text in texts),
                     key=lambda pair: len(pair[0]))
    for start in range(0, len(encoded), batch_size):
        chunk = [ids for ids, _ in encoded[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_messages(chunk, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        message_losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none",
                                         ignore_index=-100).sum(1).cpu()
        loss_sum += message_losses.sum().item()
        for (ids, words), loss in zip(encoded[start:start + batch_size], message_losses.tolist()):
            if len(ids) > 1 and ids[-1] == eos:  # the closing EOS is there: the whole message was scored
                whole_loss_sum, whole_words = whole_loss_sum + loss, whole_words + words
            else:
                cut_messages += 1
        predicted = logits.argmax(-1).cpu()
        right = predicted == targets.cpu()
        seen = targets.cpu() != -100
        tokens_seen += int(seen.sum())
        tokens_right += int((right & seen).sum())
        for row, ids in enumerate(chunk):
            names = [None if i == eos else vocabulary[i] for i in ids]
            for word_start, word_end in word_boundaries(names):
                # positions p predict token p + 1: the word's tokens, then a word-ending token
                words_seen += 1
                words_right += int(bool(right[row, word_start - 1:word_end - 1].all())
                                   and bool(ends_word[predicted[row, word_end - 1]]))
    return {"perplexity": math.exp(loss_sum / max(tokens_seen, 1)),
            "word_perplexity": math.exp(whole_loss_sum / whole_words) if whole_words else None,
            "next_token_accuracy": tokens_right / max(tokens_seen, 1),
            "next_word_accuracy": words_right / max(words_seen, 1),
            "words": whole_words, "cut_messages": cut_messages}


def canary_messages(count, generator, vocabulary, words_per_message=6):
    """Black-box audit canaries (the secret sharer's random sequences): `count` messages of `words_per_message` words
    drawn uniformly, with `generator` (a random.Random), from `vocabulary`."""
    return [" ".join(generator.choice(vocabulary) for _ in range(words_per_message)) for _ in range(count)]


def whole_word_vocabulary(tokenizer, min_length=3):
    """The lowercase alphabetic words that are one token of the tokenizer with a leading space: canaries made of
    them have a known number of tokens and are as likely as each other before training."""
    return sorted({token[1:] for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
                   if token.startswith(WORD_START) and token[1:].isalpha() and token[1:].islower()
                   and len(token) > min_length})


@torch.no_grad()
def message_losses(model, tokenizer, texts, max_length, batch_size=64):
    """Each message's summed next-token loss (EOS + message + EOS, as stage 6 trains on it), a tensor (len(texts),)."""
    device = next(model.parameters()).device
    losses = []
    for start in range(0, len(texts), batch_size):
        encoded = [encode_message(tokenizer, text, max_length) for text in texts[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate_messages(encoded, tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                                      ignore_index=-100).sum(1).cpu())
    return torch.cat(losses)


def exposure(canary_losses, reference_losses):
    """The secret sharer's exposure of each canary (Carlini et al. 2019): log2 of the number of candidates minus
    log2 of the canary's rank by loss among them, the candidates being the canary and `reference_losses` (random
    messages of the same format never trained on)."""
    reference = torch.sort(reference_losses).values
    ranks = torch.searchsorted(reference, canary_losses) + 1  # 1: no reference message is more likely
    return math.log2(len(reference) + 1) - torch.log2(ranks.double())


@dataclass
class MessageCanaries:
    """The black-box audit's canaries: `messages` of random words, each trained on with probability 1/2 (`included`,
    a secret coin), and `references`, random messages of the same format never trained on (exposure's candidates);
    all drawn from one secret seed, so a resumed run draws the same."""

    messages: list
    included: list
    references: list

    @classmethod
    def draw(cls, count: int, seed: int, tokenizer, reference_count: int = 2000) -> "MessageCanaries":
        generator = random.Random(seed)
        vocabulary = whole_word_vocabulary(tokenizer)
        if len(vocabulary) < MIN_CANARY_VOCABULARY:
            raise ValueError(f"the tokenizer has {len(vocabulary)} whole-word tokens; canary messages need at least "
                             f"{MIN_CANARY_VOCABULARY} (a tokenizer trained on more text)")
        messages = canary_messages(count, generator, vocabulary)
        included = [generator.random() < 0.5 for _ in messages]
        return cls(messages, included, canary_messages(reference_count, generator, vocabulary))

    def trained_on(self) -> list:
        return [text for text, inside in zip(self.messages, self.included) if inside]

    def result(self, model, tokenizer, max_length: int, delta: float) -> tuple:
        """(the audit from each canary's loss in `model`, mean exposure of the included and excluded canaries)."""
        losses = message_losses(model, tokenizer, self.messages, max_length)
        exposures = exposure(losses, message_losses(model, tokenizer, self.references, max_length))
        inside = torch.tensor(self.included)
        found: AuditResult = audit(-losses.numpy(), self.included, delta)
        return found, float(exposures[inside].mean()), float(exposures[~inside].mean())

"""Next-word prediction: metrics against hand-computed values, the LM loss through the engine against brute
force, the chat target loader on a small fixture, and stage 6 --task lm end to end."""

import json
import math
import os
import zipfile

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from common.data import load_target_task
from common.dp.per_example_grads import PerExampleGradients
from common.language_modelling import (
    canary_messages,
    collate_messages,
    encode_message,
    evaluate_language_model,
    exposure,
    language_modelling_losses,
    message_losses,
    whole_word_vocabulary,
    word_boundaries,
)
from common.stage import DataError
from dp_finetuning import dp_finetune
from pretraining.pretrain_gpt2 import train_tokenizer
from tests.oracle import lm_loss_per_example, norms_and_clipped_sum, per_example_grads


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["a b", "a c", "a b c"] * 50, vocab_size=270)


class Bigram(nn.Module):
    """Logits of the next token depend on the current token only: a table of log-probabilities."""

    def __init__(self, log_probabilities):
        super().__init__()
        self.table = nn.Parameter(log_probabilities)

    def forward(self, input_ids, attention_mask=None):
        return type("Output", (), {"logits": self.table[input_ids]})()


def test_word_boundaries():
    assert word_boundaries([None, "a", "\u0120b", "c", "\u0120d", None]) == [(2, 4), (4, 5)]
    assert word_boundaries([None, "a", "\u0120b", "\u0120c"]) == [(2, 3)]  # cut: the last word is left out
    assert word_boundaries([None, "a", None]) == []


def test_metrics_against_hand_computed_values(tokenizer):
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("a", "\u0120b", "\u0120c")}
    eos = tokenizer.eos_token_id
    assert encode_message(tokenizer, "A b", 16) == [eos, ids["a"], ids["\u0120b"], eos]  # lowercased
    vocabulary = len(tokenizer)
    probabilities = torch.full((vocabulary, vocabulary), 1e-3)
    probabilities[eos, ids["a"]] = 0.9               # a message starts with "a"
    probabilities[ids["a"], ids["\u0120b"]] = 0.6    # "a" is followed by " b" (greedy), " c" less often
    probabilities[ids["a"], ids["\u0120c"]] = 0.3
    probabilities[ids["\u0120b"], eos] = 0.8
    probabilities[ids["\u0120c"], eos] = 0.7
    probabilities /= probabilities.sum(1, keepdim=True)
    metrics = evaluate_language_model(Bigram(probabilities.log()), tokenizer, ["a b", "a c"], max_length=16)
    p = probabilities
    targets = [(eos, ids["a"]), (ids["a"], ids["\u0120b"]), (ids["\u0120b"], eos),
               (eos, ids["a"]), (ids["a"], ids["\u0120c"]), (ids["\u0120c"], eos)]
    expected_perplexity = math.exp(-sum(math.log(p[i, j].item()) for i, j in targets) / 6)
    assert metrics["perplexity"] == pytest.approx(expected_perplexity, rel=1e-5)
    assert metrics["next_token_accuracy"] == pytest.approx(5 / 6)   # " c" after "a" is missed
    assert metrics["next_word_accuracy"] == pytest.approx(1 / 2)    # "b" right, "c" wrong


def test_word_perplexity_divides_by_words_and_leaves_cut_messages_out(tokenizer):
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("a", "\u0120b", "c")}
    eos = tokenizer.eos_token_id
    assert encode_message(tokenizer, "a bc", 16) == [eos, ids["a"], ids["\u0120b"], ids["c"], eos]  # 2 words, 4 tokens
    torch.manual_seed(0)
    probabilities = torch.rand(len(tokenizer), len(tokenizer)) + 0.01
    probabilities /= probabilities.sum(1, keepdim=True)
    long_message = " ".join(["a b"] * 10)  # cut at max_length 8
    metrics = evaluate_language_model(Bigram(probabilities.log()), tokenizer, ["a b", "a bc", long_message],
                                      max_length=8)
    p = probabilities
    scored = [(eos, ids["a"]), (ids["a"], ids["\u0120b"]), (ids["\u0120b"], eos),
              (eos, ids["a"]), (ids["a"], ids["\u0120b"]), (ids["\u0120b"], ids["c"]), (ids["c"], eos)]
    nll = -sum(math.log(p[i, j].item()) for i, j in scored)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(nll / (3 + 3)), rel=1e-5)  # words + end of message
    assert metrics["words"] == 6 and metrics["cut_messages"] == 1
    cut = encode_message(tokenizer, long_message, 8)
    assert len(cut) == 7 and cut[-1] != eos  # EOS + 6 tokens, no closing EOS
    nll_cut = -sum(math.log(p[i, j].item()) for i, j in zip(cut[:-1], cut[1:]))
    assert metrics["perplexity"] == pytest.approx(math.exp((nll + nll_cut) / (7 + 6)), rel=1e-5)  # all tokens


def test_a_word_is_right_only_if_the_prediction_then_ends_it(tokenizer):
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("a", "\u0120b", "c")}
    eos = tokenizer.eos_token_id
    probabilities = torch.full((len(tokenizer), len(tokenizer)), 1e-3)
    probabilities[eos, ids["a"]] = 0.9
    probabilities[ids["a"], ids["\u0120b"]] = 0.9
    probabilities[ids["\u0120b"], ids["c"]] = 0.9  # greedy continues the word: "bc", not "b"
    probabilities /= probabilities.sum(1, keepdim=True)
    metrics = evaluate_language_model(Bigram(probabilities.log()), tokenizer, ["a b"], max_length=16)
    assert metrics["next_token_accuracy"] == pytest.approx(2 / 3)
    assert metrics["next_word_accuracy"] == 0.0


def test_lm_loss_through_the_engine_matches_brute_force(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = collate_messages([encode_message(tokenizer, text, 16) for text in ("a b c", "a", "a c b a b")],
                             tokenizer.eos_token_id)
    assert (batch["labels"] == -100).sum() > 0 and batch["labels"][1, 2] == tokenizer.eos_token_id
    losses = language_modelling_losses(model, batch)
    oracle_losses = lm_loss_per_example(model(input_ids=batch["input_ids"],
                                              attention_mask=batch["attention_mask"]).logits, batch["labels"])
    torch.testing.assert_close(losses, oracle_losses)
    reference_norms, reference_sum = norms_and_clipped_sum(per_example_grads(model, batch, lm_loss_per_example), 0.5)
    engine = PerExampleGradients(model, 0.5)
    norms = engine.backward(language_modelling_losses(model, batch))
    torch.testing.assert_close(norms.double(), reference_norms, rtol=1e-5, atol=1e-7)
    params = dict(model.named_parameters())
    for name, reference in reference_sum.items():
        torch.testing.assert_close(params[name].grad.double(), reference, rtol=1e-4, atol=1e-7)


def fake_chat_wheel(cache_dir, conversations):
    wheel_dir = cache_dir / "wheels"
    wheel_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel_dir / "chitchat_dataset-0.9.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("chitchat_dataset/dataset.json", json.dumps(conversations))


def test_chat_target_splits_by_conversation(tmp_path):
    conversations = {
        f"conversation-{c}": {"messages": [[{"text": f" hi  there {c} {m} ", "sender": f"user-{c % 3}",
                                             "timestamp": "2018-05-02T19:38:15Z"} for m in range(3)],
                                           [{"text": "   ", "sender": "user-9", "timestamp": ""}]],
                              "ratings": {}, "start": "", "prompt": ""}
        for c in range(40)}
    fake_chat_wheel(tmp_path, conversations)
    task = load_target_task("chat", label_column=None, cache_dir=str(tmp_path), seed=1)
    sizes = [len(task[s]) for s in ("train", "validation", "test")]
    assert sum(sizes) == 40 * 3 and all(size % 3 == 0 and size > 0 for size in sizes)  # whole conversations
    assert sizes[0] >= 30 * 3  # about 5% of the conversations each for validation and test
    owners = {name: set(task[name]["conversation"]) for name in task}
    assert not owners["train"] & owners["validation"] and not owners["train"] & owners["test"]
    assert not owners["validation"] & owners["test"]
    assert task["train"][0]["sentence"].startswith("hi there") and task["train"][0]["sender"].startswith("user-")
    other_seed = load_target_task("chat", label_column=None, cache_dir=str(tmp_path), seed=2)
    assert set(other_seed["validation"]["conversation"]) != owners["validation"]
    with pytest.raises(DataError, match="--task lm"):
        load_target_task("chat", cache_dir=str(tmp_path))


@pytest.mark.slow
def test_stage6_language_modelling_end_to_end(tmp_path):
    from datasets import Dataset

    from pretraining import pretrain_gpt2
    messages = [f"see you at {h} tonight ok" for h in range(1, 13)] * 30
    Dataset.from_dict({"text": messages}).save_to_disk(str(tmp_path / "public"))
    pretrain_gpt2.main(["--dataset_path", str(tmp_path / "public"), "--output_dir", str(tmp_path / "model"),
                        "--model_size", "nano", "--vocab_size", "300", "--block_size", "32",
                        "--per_device_train_batch_size", "8", "--max_train_steps", "30", "--learning_rate", "3e-3"])
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"sentence": m}) + "\n" for m in messages))
    dp_finetune.main(["--task", "lm", "--model_name_or_path", str(tmp_path / "model"), "--target", str(target),
                      "--output_dir", str(tmp_path / "run" / "finetune"), "--noise_multiplier", "0.5",
                      "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "2",
                      "--learning_rate", "3e-3", "--num_train_epochs", "2", "--max_length", "16",
                      "--max_eval_samples", "20"])
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    assert results["task"] == "lm" and len(results["val_perplexity_per_epoch"]) == 2
    assert 1 < results["test_perplexity"] < 300 and results["test_next_word_accuracy"] > 0.3
    assert 0 <= results["test_next_token_accuracy"] <= 1 and results["epsilon"] > 0
    assert {"model.safetensors", "privacy.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "run" / "finetune"))
    released = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "finetune")
    assert released.lm_head.weight is released.transformer.wte.weight


def test_black_box_canaries_their_losses_and_exposure(tokenizer):
    """Canaries are words of the vocabulary that are one token each; a message's loss is the hand-summed bigram
    negative log-likelihood; exposure is log2(R + 1) - log2(rank) among R reference messages (Carlini et al.)."""
    import random
    vocabulary = whole_word_vocabulary(tokenizer, min_length=1)
    assert set(vocabulary) == {"b", "c"}  # "a" never follows a space in the corpus: no token " a"
    messages = canary_messages(5, random.Random(0), vocabulary, words_per_message=3)
    assert messages == canary_messages(5, random.Random(0), vocabulary, words_per_message=3)
    assert all(len(m.split()) == 3 and set(m.split()) <= {"b", "c"} for m in messages)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("a", "\u0120b", "\u0120c")}
    eos = tokenizer.eos_token_id
    probabilities = torch.full((len(tokenizer), len(tokenizer)), 1e-3)
    probabilities[eos, ids["a"]] = 0.9
    probabilities[ids["a"], ids["\u0120b"]] = 0.6
    probabilities[ids["\u0120b"], eos] = 0.8
    probabilities /= probabilities.sum(1, keepdim=True)
    log_p = probabilities.log()
    losses = message_losses(Bigram(log_p), tokenizer, ["a b", "a c"], max_length=16)
    expected = [-(log_p[eos, ids["a"]] + log_p[ids["a"], ids["\u0120" + w]] + log_p[ids["\u0120" + w], eos]).item()
                for w in ("b", "c")]
    assert losses.tolist() == pytest.approx(expected, rel=1e-4)
    references = torch.tensor([1.0, 2.0, 3.0])
    assert exposure(torch.tensor([0.5, 2.5, 9.0]), references).tolist() == pytest.approx(
        [2.0, 2.0 - math.log2(3), 0.0])  # rank 1 of 4, rank 3 of 4, rank 4 of 4

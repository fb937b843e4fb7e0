"""scripts/predict.py against the model itself: next-word probabilities from full forward passes, the greedy
continuation from transformers' own greedy decoding, and the privacy line of a release."""

import json
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pretraining.pretrain_gpt2 import train_tokenizer
from scripts import predict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(["are you coming tonight", "i think so", "you are late", "coming home"] * 40,
                                vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_next_words_and_their_probabilities_match_full_forward_passes(model_dir):
    tokenizer = predict.PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = [tokenizer.eos_token_id] + tokenizer("are you", add_special_tokens=False)["input_ids"]
    words = predict.next_words(model, tokenizer, ids, top_k=4)
    assert len(words) == 4 and [p for _, p in words] == sorted((p for _, p in words), reverse=True)
    for word, probability in words:
        path = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + path])).logits[0].softmax(-1)
        expected = math.prod(logits[len(ids) - 1 + i, token].item() for i, token in enumerate(path))
        assert probability == pytest.approx(expected, rel=1e-4)


def test_the_continuation_is_greedy_decoding(model_dir):
    tokenizer = predict.PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = [tokenizer.eos_token_id] + tokenizer("i think", add_special_tokens=False)["input_ids"]
    reference = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                               eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in reference:
        reference = reference[:reference.index(tokenizer.eos_token_id)]
    assert predict.continuation(model, tokenizer, ids, 8) == tokenizer.decode(reference)


def test_the_output_names_what_the_model_is(model_dir, capsys):
    predict.main(["--model_name_or_path", str(model_dir), "--prompt", "are you", "--top_k", "2"])
    output = capsys.readouterr().out
    assert output.startswith("no privacy.json and no DP release behind it") and "next words: " in output
    (model_dir / "dp_releases.json").write_text(json.dumps({"dp_releases": [{"stage": "domain_classifier"}]}))
    predict.main(["--model_name_or_path", str(model_dir), "--prompt", "are you"])
    assert "derived from the DP release(s) domain_classifier" in capsys.readouterr().out
    (model_dir / "privacy.json").write_text(json.dumps({"epsilon": {"epsilon": float("inf")}}))
    predict.main(["--model_name_or_path", str(model_dir), "--prompt", "are you"])
    assert "NOT a DP release" in capsys.readouterr().out
    (model_dir / "privacy.json").write_text(json.dumps({"stage": "finetune", "epsilon": {"epsilon": 2.5},
                                                         "delta": 1e-5, "adjacency": "add or remove one example"}))
    (model_dir / "results.json").write_text(json.dumps({"composed_epsilon": 3.5, "delta": 1e-5,
                                                         "dp_releases": ["domain_classifier", "finetune"]}))
    predict.main(["--model_name_or_path", str(model_dir), "--prompt", "are you"])
    assert ("a DP release: epsilon 3.500 at delta 1e-05 for add or remove one example, composed over the DP releases "
            "the model depends on (domain_classifier + finetune); this stage alone 2.500") in capsys.readouterr().out

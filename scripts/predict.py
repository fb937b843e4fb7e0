"""What a next-word prediction model predicts for your prompts: its top next words and a short greedy
continuation.

    python scripts/predict.py --model_name_or_path runs/demo_lm/finetune --prompt "are you coming" --prompt "i think"

Prompts are lowercased and start after EOS, as stage 6 trained on messages. Everything printed is computed
from the released model alone: post-processing of the DP releases it depends on, at no privacy cost beyond
their composed epsilon (printed first, from results.json; a model fine-tuned without noise is no DP release).
"""

import argparse
import json
import math
import os

import torch
from transformers import AutoConfig, GPT2LMHeadModel, PreTrainedTokenizerFast

from common.language_modelling import WORD_START
from common.stage import DataError, run_stage


def forward(model, ids):
    """The next-token logits after `ids` (one unpadded sequence)."""
    input_ids = torch.tensor([ids])
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0, -1].float()


def next_words(model, tokenizer, ids, top_k, max_word_tokens=6):
    """The words that follow `ids`: from each of the top_k first tokens of a word, greedy to the word's end; with
    the probability of that token path, most likely first."""
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        probabilities = forward(model, ids).softmax(-1)
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    starts = [i for i in probabilities.argsort(descending=True).tolist() if vocabulary[i].startswith(WORD_START)]
    words = []
    for first in starts[:top_k]:
        path, probability = [first], probabilities[first].item()
        for _ in range(max_word_tokens - 1):
            with torch.no_grad():
                step = forward(model, ids + path).softmax(-1)
            token = int(step.argmax())
            if token == eos or vocabulary[token].startswith(WORD_START):
                break
            path, probability = path + [token], probability * step[token].item()
        words.append((tokenizer.decode(path).strip(), probability))
    return sorted(words, key=lambda pair: -pair[1])


def continuation(model, tokenizer, ids, max_new_tokens):
    """Greedy decoding from `ids` until EOS or max_new_tokens."""
    generated = []
    for _ in range(max_new_tokens):
        token = int(forward(model, ids + generated).argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
    return tokenizer.decode(generated)


def read_json(directory, name):
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def privacy_line(model_dir):
    """What the model's outputs are post-processing of: its DP releases and their composed epsilon."""
    report, results = read_json(model_dir, "privacy.json"), read_json(model_dir, "results.json") or {}
    depends_on = [r["stage"] for r in (read_json(model_dir, "dp_releases.json") or {}).get("dp_releases", [])]
    if report is None:
        if depends_on:
            return (f"not a DP release itself, but derived from the DP release(s) {' + '.join(depends_on)} (their "
                    "privacy.json): what follows is post-processing of them, at no further privacy cost")
        return "no privacy.json and no DP release behind it: a model of public data only"
    if math.isinf(report["epsilon"]["epsilon"]):
        return "epsilon infinite: fine-tuned without noise, NOT a DP release; its outputs may reveal private data"
    composed = results.get("composed_epsilon", report["epsilon"]["epsilon"])
    delta = results.get("delta", report["delta"])
    releases = " + ".join(results.get("dp_releases", depends_on) or [report["stage"]])
    return (f"a DP release: epsilon {composed:.3f} at delta {delta:.3g} for {report.get('adjacency', 'one example')}, "
            f"composed over the DP releases the model depends on ({releases}); this stage alone "
            f"{report['epsilon']['epsilon']:.3f}. What follows is post-processing, at no further privacy cost")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a stage 6 release (or a stage 5 model)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--top_k", type=int, default=5, help="next words shown per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=20, help="length of the greedy continuation")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model_name_or_path, "config.json")):
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: no model there (expected a stage 6 "
                        "release or a stage 5 output)")
    if args.top_k < 1 or args.max_new_tokens < 0:
        raise DataError("--top_k must be at least 1 and --max_new_tokens at least 0")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model_name_or_path)
    architectures = AutoConfig.from_pretrained(args.model_name_or_path).architectures or ["GPT2LMHeadModel"]
    if architectures[0] != "GPT2LMHeadModel":
        raise DataError(f"--model_name_or_path {args.model_name_or_path}: a {architectures[0]}, not a next-word "
                        "prediction model (stage 6 with --task lm, or stage 5)")
    model = GPT2LMHeadModel.from_pretrained(args.model_name_or_path).eval()
    print(privacy_line(args.model_name_or_path))
    for prompt in args.prompt:
        ids = [tokenizer.eos_token_id] + tokenizer(prompt.lower().rstrip(), add_special_tokens=False)["input_ids"]
        words = ", ".join(f"{word} ({probability:.3f})" for word, probability in next_words(model, tokenizer, ids,
                                                                                             args.top_k))
        greedy = continuation(model, tokenizer, ids, args.max_new_tokens)
        print(f"{prompt!r}\n  next words: {words}\n  greedy: {prompt}{greedy}")


if __name__ == "__main__":
    run_stage(main, timed=False)

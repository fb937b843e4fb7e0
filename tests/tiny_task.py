"""A tiny sequence-classification task for the DP loop's tests (also run under torchrun)."""

import argparse

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from common.dp.training import DPConfig, add_dp_arguments


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=2,
                        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(config)


def tiny_dataset(size=64, seq_len=8, seed=0):
    """Label 1 iff the last token (the one GPT-2 classifies from) is in the upper half of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (size, seq_len), generator=generator)
    return [{"input_ids": ids[i], "labels": int(ids[i, -1] >= 20)} for i in range(size)]


def collate(examples):
    return {"input_ids": torch.stack([e["input_ids"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


def parse_dp_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    return DPConfig.from_args(add_dp_arguments(parser).parse_args(argv))

"""Loading a stage 5 output (GPT-2 and its tokenizer) for the stages and diagnostics that read one: stage 6,
the linear probe, the gradient signal-to-noise diagnostic and predict.py. Errors name the directory and
what is missing."""

import logging
import os

import torch
from safetensors import SafetensorError
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as transformers_logging

from common.data import TEXT_COLUMN_HELP
from common.stage import DataError

FREEZE_CHOICES = ("none", "embeddings", "body")
POOLING_CHOICES = ("last", "mean")
OUTPUT_OPTIONS = ("return_dict", "output_attentions", "output_hidden_states", "use_cache")
LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


class GPT2MeanPooledClassifier(GPT2ForSequenceClassification):
    """`GPT2ForSequenceClassification` whose head reads the mean of the final hidden states over each
    sentence's tokens (its attention mask) rather than the last token's: a small model's mean keeps
    sentiment that its last token loses (the recipe search in docs/results.md)."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        # PEFT passes every argument of the stock forward; only the output options may be set
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in OUTPUT_OPTIONS)
        if unsupported:
            raise ValueError(f"GPT2MeanPooledClassifier takes input_ids and attention_mask only, got {unsupported}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return SequenceClassifierOutput(logits=self.score((hidden * mask).sum(1) / mask.sum(1)))


def add_pooling_argument(parser):
    parser.add_argument("--pooling", choices=POOLING_CHOICES, default="last",
                        help="classification: the head reads the last non-padding token (GPT2ForSequenceClassification)"
                             " or the mean over the sentence's tokens (GPT2MeanPooledClassifier)")


def add_model_and_target_arguments(parser, model_help, max_length):
    """The flags of a diagnostic that reads a model on a classification target (linear_probe.py, gradient_snr.py)."""
    parser.add_argument("--model_name_or_path", required=True, help=model_help)
    parser.add_argument("--random_init", action="store_true", help="fresh weights of the same config")
    parser.add_argument("--target", default="demo", help="a classification target: 'demo', 'glue/sst2' or local files")
    parser.add_argument("--text_column", default=None, help=TEXT_COLUMN_HELP)
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_length", type=int, default=max_length)


class _WithoutLoadReport(logging.Filter):
    def filter(self, record):
        return "LOAD REPORT" not in record.getMessage()


def _from_pretrained(model_class, path, extra):
    """(model, loading info) without transformers' load report, which the caller checks instead."""
    logger, report_filter = transformers_logging.get_logger("transformers.modeling_utils"), _WithoutLoadReport()
    logger.addFilter(report_filter)
    try:
        return model_class.from_pretrained(path, output_loading_info=True, **extra)
    finally:
        logger.removeFilter(report_filter)


def load_stage5(path, model_class, random_init=False, new_keys=(), **extra):
    """(model, tokenizer) of `model_class` from a stage 5 output at `path` (with `random_init`: fresh weights of its
    config); weights missing from the checkpoint are refused unless their names start with one of `new_keys` (a
    new head). The tokenizer pads with EOS on the right."""
    for required in ("config.json", "tokenizer.json"):
        if not os.path.isfile(os.path.join(path, required)):
            raise DataError(f"--model_name_or_path {path}: no {required}; expected a stage 5 output (model and "
                            "tokenizer)")
    if not random_init and not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise DataError(f"--model_name_or_path {path}: no model.safetensors (use --random_init for no pre-training)")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        if random_init:
            model = model_class(model_class.config_class.from_pretrained(path, **extra))
        else:
            model, loading = _from_pretrained(model_class, path, extra)
    except LOAD_ERRORS as error:
        raise DataError(f"--model_name_or_path {path}: corrupted or not a stage 5 output "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    if not random_init:
        missing = [key for key in loading["missing_keys"] if not key.startswith(tuple(new_keys))]
        if missing:
            raise DataError(f"--model_name_or_path {path}: weights missing from model.safetensors: "
                            f"{', '.join(sorted(missing)[:5])}")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_finetuning_model(path, task, pooling="last", random_init=False, seed=0, freeze="none", lora_r=0):
    """(model, tokenizer) to fine-tune from a stage 5 output: a language model (task 'lm') or a classifier with a
    fresh head reading the last token or the mean (`pooling`); `freeze` or `lora_r` choose what trains."""
    torch.manual_seed(seed)
    classifier = GPT2MeanPooledClassifier if pooling == "mean" else GPT2ForSequenceClassification
    if task == "lm":
        model, tokenizer = load_stage5(path, GPT2LMHeadModel, random_init)
    else:
        model, tokenizer = load_stage5(path, classifier, random_init, new_keys=("score.",), num_labels=2)
    if lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            r=lora_r, lora_alpha=2 * lora_r, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"],
            task_type="CAUSAL_LM" if task == "lm" else "SEQ_CLS"))
    elif freeze != "none":
        frozen = model.transformer.wte, model.transformer.wpe
        if freeze == "body":
            frozen = frozen + (model.transformer.h,)
        for module in frozen:
            module.requires_grad_(False)
    return model, tokenizer

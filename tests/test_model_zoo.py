"""The engine on tiny random configurations of the architectures researchers fine-tune: with every parameter
trainable (and with LoRA on some), each is exact against brute force (tests/oracle.py) or refused with an error that
names the parameter or layer, never silently different. The README's list of supported architectures is this one."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from common.dp.per_example_grads import PerExampleGradients, UnsupportedParameterError
from tests.oracle import (
    assert_engine_matches_brute_force,
    batch_losses,
    classification_loss_per_example,
    lm_loss_per_example,
    per_example_grads,
)

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=64, num_key_value_heads=2, head_dim=8, pad_token_id=0, num_labels=2)
DROPOUTS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
            "attention_dropout", "hidden_dropout", "dropout", "classifier_dropout")
EXACT = "exact"
# model type -> (causal LM?, expected outcome: EXACT, or (error type, what the message must name))
ZOO = {
    "gpt2": (True, EXACT), "gpt_neox": (True, EXACT), "phi": (True, EXACT), "stablelm": (True, EXACT),
    "llama": (True, EXACT), "mistral": (True, EXACT), "qwen2": (True, EXACT), "qwen3": (True, EXACT),
    "phi3": (True, EXACT), "gemma": (True, EXACT), "gemma2": (True, EXACT), "gemma3_text": (True, EXACT),
    "smollm3": (True, EXACT), "olmo2": (True, EXACT), "granite": (True, EXACT),
    "bert": (False, EXACT), "roberta": (False, EXACT), "distilbert": (False, EXACT), "albert": (False, EXACT),
    "electra": (False, EXACT), "xlm-roberta": (False, EXACT), "modernbert": (False, EXACT),
    "opt": (True, EXACT), "bart": (False, EXACT),
    "cohere": (True, (UnsupportedParameterError, "'model.layers.0.input_layernorm.weight' belongs to CohereLayerNorm")),
    "falcon": (True, (RuntimeError, "layer 'transformer.h.0.mlp.dense_4h_to_h' was modified in place")),
}
LORA = {"llama": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"], "qwen3": ["q_proj", "down_proj"],
        "bert": ["query", "value"]}


def tiny_model(model_type, lm):
    extra = {k: v for k, v in SMALL.items() if not (model_type == "falcon" and k == "head_dim")}
    config = AutoConfig.for_model(model_type, **extra)
    for name in DROPOUTS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    return (AutoModelForCausalLM if lm else AutoModelForSequenceClassification).from_config(config).eval()


def padded_batch(lm):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([12, 7, 3, 10, 5])
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids = torch.randint(2, VOCAB, (5, 12), generator=generator) * mask
    labels = ids.masked_fill(mask == 0, -100) if lm else torch.randint(0, 2, (5,), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def check_exact(model, lm):
    batch = padded_batch(lm)
    if model.config.model_type == "bart":  # its classifier reads the last end-of-sequence token: one per example
        eos, ids = model.config.eos_token_id, batch["input_ids"]
        ids = ids.masked_fill(ids == eos, eos + 1)
        ids[torch.arange(len(ids)), batch["attention_mask"].sum(1) - 1] = eos
        batch["input_ids"] = ids
    loss_fn = lm_loss_per_example if lm else classification_loss_per_example
    assert_engine_matches_brute_force(model, lambda m: batch_losses(m, batch, loss_fn),
                                      per_example_grads(model, batch, loss_fn), rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ZOO)
def test_every_parameter_trainable_is_exact_or_refused_by_name(model_type):
    lm, expected = ZOO[model_type]
    model = tiny_model(model_type, lm)
    if expected == EXACT:
        check_exact(model, lm)
        return
    error, named = expected
    with pytest.raises(error, match=named.replace("(", r"\(").replace(")", r"\)")):
        engine = PerExampleGradients(model, 1.0)
        loss_fn = lm_loss_per_example if lm else classification_loss_per_example
        engine.backward(batch_losses(model, padded_batch(lm), loss_fn))


@pytest.mark.slow
@pytest.mark.parametrize("model_type", LORA)
def test_lora_adapters_are_exact(model_type):
    lm = ZOO[model_type][0]
    model = get_peft_model(tiny_model(model_type, lm), LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA[model_type], init_lora_weights=False,
        task_type="CAUSAL_LM" if lm else "SEQ_CLS")).eval()
    check_exact(model, lm)

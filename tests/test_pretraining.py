import json
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from common.stage import DataError
from pretraining import pretrain_gpt2

WORDS = "the film was a long and quiet story about a family who moved to the sea in winter".split()


@pytest.fixture
def sentences(tmp_path):
    generator = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=generator).tolist())
             for _ in range(600)]
    path = tmp_path / "selected"
    Dataset.from_dict({"text": texts}).save_to_disk(str(path))
    return path


def argv(data, output, *extra):
    return ["--dataset_path", str(data), "--output_dir", str(output), "--model_size", "nano", "--vocab_size", "300",
            "--block_size", "32", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
            "--logging_steps", "1", *extra]


def test_a_few_steps_lower_the_loss_and_write_the_outputs(tmp_path, sentences):
    output = tmp_path / "pretrained"
    pretrain_gpt2.main(argv(sentences, output, "--max_train_steps", "30", "--eval_target", "demo"))
    losses = [json.loads(line)["loss"] for line in (output / "metrics.jsonl").open()]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    results = json.loads((output / "eval_results.json").read_text())
    assert results["held_out_perplexity"] < 300 and results["target_validation_perplexity"] > 1
    # a 300-token vocabulary cuts words into several tokens: per word, the perplexity is higher
    assert results["target_validation_word_perplexity"] > results["target_validation_perplexity"]
    assert json.loads((output / "config.json").read_text())["selective_pretraining_size"] == "nano"
    assert (output / "loss.png").exists() and (output / "checkpoint-30").is_dir()
    assert results["steps"] == 30 and results["tokens_seen"] == 30 * 8 * 32


def test_a_token_budget_sets_the_steps(tmp_path, sentences):
    output = tmp_path / "pretrained"
    # 0.002M tokens in steps of 8 x 32 = 256 tokens: 7.8, so 8 steps
    pretrain_gpt2.main(argv(sentences, output, "--max_train_tokens", "0.002", "--max_train_steps", "1000"))
    results = json.loads((output / "eval_results.json").read_text())
    assert results["steps"] == 8 and results["tokens_seen"] == 2048
    with pytest.raises(DataError, match="--max_train_tokens must be positive"):
        pretrain_gpt2.main(argv(sentences, tmp_path / "bad", "--max_train_tokens", "0"))


def test_checkpoint_loads_for_sequence_classification(tmp_path, sentences):
    output = tmp_path / "pretrained"
    pretrain_gpt2.main(argv(sentences, output, "--max_train_steps", "2"))
    assert not (output / "loss.png").exists()  # two points make no curve
    model = GPT2ForSequenceClassification.from_pretrained(str(output), num_labels=2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(output))
    batch = tokenizer(["a quiet film", "the sea in winter was long"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)
    lm = GPT2LMHeadModel.from_pretrained(str(output))
    assert torch.equal(model.transformer.wte.weight, lm.transformer.wte.weight)
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_resume_continues_with_the_same_data_order(tmp_path, sentences):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    pretrain_gpt2.main(argv(sentences, full, "--max_train_steps", "8", "--checkpointing_steps", "4"))
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    # killed after step 6: its metrics went past the checkpoint
    (resumed / "metrics.jsonl").write_text("".join((full / "metrics.jsonl").read_text().splitlines(True)[:6]))
    pretrain_gpt2.main(argv(sentences, resumed, "--max_train_steps", "8", "--resume_from_checkpoint", "latest"))
    a, b = GPT2LMHeadModel.from_pretrained(str(full)), GPT2LMHeadModel.from_pretrained(str(resumed))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    full_records = [json.loads(line) for line in (full / "metrics.jsonl").open()]
    resumed_records = [json.loads(line) for line in (resumed / "metrics.jsonl").open()]
    assert [r["step"] for r in resumed_records] == list(range(1, 9))
    assert [r["loss"] for r in resumed_records] == pytest.approx([r["loss"] for r in full_records], rel=1e-5)


def test_bad_inputs(tmp_path, sentences):
    with pytest.raises(DataError, match="no tokenizer there or in the local cache"):
        pretrain_gpt2.main(argv(sentences, tmp_path / "t", "--tokenizer_name_or_path", str(tmp_path / "none")))
    with pytest.raises(DataError, match="--model_size 'huge'"):
        pretrain_gpt2.main(argv(sentences, tmp_path / "a", "--model_size", "huge"))
    Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nocolumn"))
    with pytest.raises(DataError, match="no column 'text'"):
        pretrain_gpt2.main(argv(tmp_path / "nocolumn", tmp_path / "b"))
    Dataset.from_dict({"text": ["one short sentence"] * 3}).save_to_disk(str(tmp_path / "short"))
    with pytest.raises(DataError, match="too little text"):
        pretrain_gpt2.main(argv(tmp_path / "short", tmp_path / "c"))
    pretrain_gpt2.main(argv(sentences, tmp_path / "d", "--max_train_steps", "2", "--checkpointing_steps", "2"))
    with pytest.raises(DataError, match="a nano model, but --model_size is micro"):
        pretrain_gpt2.main(argv(sentences, tmp_path / "e", "--model_size", "micro", "--max_train_steps", "2",
                                "--resume_from_checkpoint", str(tmp_path / "d" / "checkpoint-2")))

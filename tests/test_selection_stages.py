import json
import os

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from common.dp.per_example_grads import PerExampleGradients
from common.stage import DataError
from data_selection import domain_classifier, sampling_with_logits, train_domain_classifier
from data_selection.domain_classifier import build_classifier, load_classifier
from tests.two_nodes import ROOT, run_two_nodes

FILM = "film movie actor scene plot funny boring director cast drama comedy screen".split()
MARKET = "stock market shares bank profit investor trade price index fund bond rate".split()


def sentences_of(words, count, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=rng.integers(6, 12))) for _ in range(count)]


@pytest.fixture
def two_domains(tmp_path):
    """Stage-2 and stage-1 outputs for a film domain (positives) against a market domain."""
    def split(count, seed):
        positives, negatives = sentences_of(FILM, count, seed), sentences_of(MARKET, 5 * count, seed + 1)
        return Dataset.from_dict({"sentence": positives + negatives, "label": [1] * count + [0] * (5 * count)})
    DatasetDict(train=split(200, 0), validation=split(40, 10)).save_to_disk(str(tmp_path / "classifier_data"))
    texts = sentences_of(FILM, 30, 20) + sentences_of(MARKET, 70, 21)
    Dataset.from_dict({"text": texts, "source": ["film"] * 30 + ["market"] * 70,
                       "doc_id": [f"d/{i}" for i in range(100)]}).save_to_disk(str(tmp_path / "sentences"))
    (tmp_path / "sentences" / "stats.json").write_text("{}")
    return tmp_path


def stage3_argv(root, *extra):
    return ["--data_dir", str(root / "classifier_data"), "--sentences_dir", str(root / "sentences"),
            "--output_dir", str(root / "run" / "domain_classifier"), "--num_buckets", "4096", "--embedding_dim", "16",
            "--noise_multiplier", "0.8", "--per_device_train_batch_size", "60", "--learning_rate", "0.05",
            "--num_train_epochs", "8", "--score_shard_size", "30", *extra]


@pytest.mark.slow
def test_private_fast_classifier_separates_two_domains(two_domains):
    train_domain_classifier.main(stage3_argv(two_domains))
    output = two_domains / "run" / "domain_classifier"
    privacy = json.loads((output / "classifier" / "privacy.json").read_text())
    assert privacy["stage"] == "domain_classifier" and privacy["noise_multiplier"] == 0.8
    assert privacy["delta"] == pytest.approx(1 / 2000)  # 1 / (10 x 200 private positives)
    ledger = json.loads((two_domains / "run" / "ledger.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["domain_classifier"]
    probability, logit = domain_classifier.load_scores(str(output / "scores"), 100)
    assert probability[:30].min() > probability[30:].max()
    assert np.allclose(probability, 1 / (1 + np.exp(-logit)), atol=1e-5)


def test_resumed_scoring_equals_uninterrupted_scoring(two_domains):
    train_domain_classifier.main(stage3_argv(two_domains, "--num_train_epochs", "1"))
    scores_dir = two_domains / "run" / "domain_classifier" / "scores"
    full = domain_classifier.load_scores(str(scores_dir), 100)
    # killed after two of four shards: the others and the completion marker are missing
    for name in ("shard-00002.npz", "shard-00003.npz", "complete.json"):
        os.remove(scores_dir / name)
    kept = (scores_dir / "shard-00000.npz").stat().st_mtime_ns
    train_domain_classifier.main(stage3_argv(two_domains, "--num_train_epochs", "1"))
    resumed = domain_classifier.load_scores(str(scores_dir), 100)
    assert (scores_dir / "shard-00000.npz").stat().st_mtime_ns == kept
    assert all(np.array_equal(a, b) for a, b in zip(full, resumed))


def test_scores_that_do_not_match_are_refused(two_domains, tmp_path):
    train_domain_classifier.main(stage3_argv(two_domains, "--num_train_epochs", "1"))
    scores_dir = str(two_domains / "run" / "domain_classifier" / "scores")
    with pytest.raises(DataError, match="100 scores for 101 sentences"):
        domain_classifier.load_scores(scores_dir, 101)
    np.savez(os.path.join(scores_dir, "shard-00001.npz"), probability=np.full(30, np.nan, np.float32),
             logit=np.zeros(30, np.float32))
    with pytest.raises(DataError, match="30 scores are NaN"):
        domain_classifier.load_scores(scores_dir, 100)
    with pytest.raises(DataError, match="not a trained domain classifier"):
        load_classifier(str(tmp_path / "missing"))


def test_selection_respects_budget_length_filter_and_order():
    words = np.array([6, 3, 8, 10, 7, 6, 2, 9])
    probability = np.array([0.9, 0.99, 0.5, 0.8, 0.7, 0.1, 0.95, 0.6])
    kept, took_all = sampling_with_logits.select(words, probability, budget=20, min_words=6, random_order=False,
                                                 seed=0)
    assert kept.tolist() == [0, 3, 4] and not took_all  # 6 + 10 = 16 < 20, + 7 passes the budget
    assert np.all(words[kept] >= 6)
    assert np.all(np.diff(probability[kept]) <= 0)
    everything, took_all = sampling_with_logits.select(words, probability, budget=1000, min_words=6,
                                                       random_order=False, seed=0)
    assert took_all and sorted(everything.tolist()) == [0, 2, 3, 4, 5, 7]


def test_random_selection_is_seeded():
    words, probability = np.full(1000, 8), np.zeros(1000)
    first = sampling_with_logits.select(words, probability, 800, 6, True, seed=3)[0]
    again = sampling_with_logits.select(words, probability, 800, 6, True, seed=3)[0]
    other = sampling_with_logits.select(words, probability, 800, 6, True, seed=4)[0]
    assert len(first) == 100 and first.tolist() == again.tolist() and first.tolist() != other.tolist()


@pytest.mark.slow
def test_stage4_writes_dataset_report_and_plot(two_domains):
    train_domain_classifier.main(stage3_argv(two_domains))
    scores_dir = str(two_domains / "run" / "domain_classifier" / "scores")
    output = two_domains / "run" / "selected"
    sampling_with_logits.main(["--sentences_dir", str(two_domains / "sentences"), "--scores_dir", scores_dir,
                               "--num_tokens", "0.2", "--output_dir", str(output)])
    report = json.loads((output / "selection_report.json").read_text())
    selected = datasets.load_from_disk(str(output))
    assert report["selected_words"] >= report["budget_words"] > 0
    assert report["selection_source_share"]["film"] == 1.0 and report["share_ratio"]["film"] > 3
    assert set(selected["source"]) == {"film"} and (output / "selection_report.png").stat().st_size > 10_000
    sampling_with_logits.main(["--sentences_dir", str(two_domains / "sentences"), "--num_tokens", "100",
                               "--random", "--output_dir", str(two_domains / "run" / "random")])
    report = json.loads((two_domains / "run" / "random" / "selection_report.json").read_text())
    assert report["budget_exceeds_corpus"] and report["selected_sentences"] == 100


def test_transformer_backbone_has_only_adapters_and_head_trainable():
    model, encode = build_classifier("transformer", "minilm")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    assert any("pooler" in name for name in trainable)
    engine = PerExampleGradients(model, 1.0)
    batch = encode(["a fine film", "the market fell sharply today"])
    losses = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]), reduction="none")
    norms = engine.backward(losses)
    assert norms.shape == (2,) and torch.all(norms > 0)


def test_document_weight_blends_the_document_mean():
    logit = np.array([4.0, -2.0, 0.0, 1.0])
    doc_ids = np.array(["a", "a", "b", "b"])
    assert np.array_equal(sampling_with_logits.document_smoothed(logit, doc_ids, 0.0), logit)
    assert np.allclose(sampling_with_logits.document_smoothed(logit, doc_ids, 1.0), [1.0, 1.0, 0.5, 0.5])
    assert np.allclose(sampling_with_logits.document_smoothed(logit, doc_ids, 0.5), [2.5, -0.5, 0.25, 0.75])


@pytest.mark.slow
def test_demo_selection_finds_the_movie_plots_at_epsilon_one(tmp_path, demo_sentences):
    """Stage 3 at epsilon 1 on the demo data: plot sentences' share of a 20% selection is >= 3x their share."""
    from data_selection import build_classifier_data
    build_classifier_data.main(["--sentences_dir", str(demo_sentences), "--output_dir", str(tmp_path / "data")])
    train_domain_classifier.main([
        "--data_dir", str(tmp_path / "data"), "--sentences_dir", str(demo_sentences),
        "--output_dir", str(tmp_path / "run" / "domain_classifier"), "--target_epsilon", "1",
        "--per_device_train_batch_size", "512", "--gradient_accumulation_steps", "16", "--learning_rate", "0.1",
        "--num_train_epochs", "6"])
    privacy = json.loads((tmp_path / "run" / "domain_classifier" / "classifier" / "privacy.json").read_text())
    assert privacy["epsilon"]["epsilon"] <= 1.0 and privacy["epsilon"]["rdp"] > 1.0
    sampling_with_logits.main(["--sentences_dir", str(demo_sentences), "--num_tokens", "0.2",
                               "--scores_dir", str(tmp_path / "run" / "domain_classifier" / "scores"),
                               "--document_weight", "0.7", "--output_dir", str(tmp_path / "selected")])
    report = json.loads((tmp_path / "selected" / "selection_report.json").read_text())
    assert report["share_ratio"]["movie_plots"] >= 3.0
    assert report["mode"] == "top 0.3 x sentence logit margin + 0.7 x its document's mean logit margin"
    assert not list((tmp_path / "selected").glob("cache-*"))


@pytest.mark.slow
def test_stage3_as_two_nodes_equals_one_process(two_domains):
    """Stage 3 (DP training, then scoring shared shard by shard) as two machines of one process each, simulated
    over loopback (torchrun --nnodes 2), gives the scores of one process."""
    common = ["--num_train_epochs", "2", "--deterministic_dp"]
    train_domain_classifier.main(stage3_argv(two_domains, *common))
    run_two_nodes(os.path.join(ROOT, "data_selection", "train_domain_classifier.py"),
                  *stage3_argv(two_domains, *common, "--per_device_train_batch_size", "30", "--output_dir",
                               str(two_domains / "two_nodes" / "domain_classifier")))
    one = domain_classifier.load_scores(str(two_domains / "run" / "domain_classifier" / "scores"), 100)
    two = domain_classifier.load_scores(str(two_domains / "two_nodes" / "domain_classifier" / "scores"), 100)
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(one, two))

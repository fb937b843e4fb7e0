import csv
import json
import statistics

import pytest

from common.stage import run_stage
from scripts import summarize_runs

# (seed, selective test accuracy, random, none) of three fake runs of one model size and budget
RUNS = [(0, 0.70, 0.64, 0.57), (1, 0.74, 0.61, 0.58), (2, 0.69, 0.66, 0.55)]


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_run(run_dir, seed, accuracies, budget=1000):
    stages = {"": ["domain_classifier", "finetune"], "baselines/random": ["finetune"],
              "baselines/scratch": ["finetune"]}
    for (sub, ledger_stages), accuracy in zip(stages.items(), accuracies):
        base = run_dir / sub if sub else run_dir
        write(base / "finetune" / "results.json", {
            "seed": seed, "val_accuracy": accuracy + 0.01, "test_accuracy": accuracy,
            "composed_epsilon": 3.99 + 0.001 * seed, "delta": 1e-5, "ledger_stages": ledger_stages,
            "dp_releases": ledger_stages})
        if sub != "baselines/scratch":
            write(base / "selected" / "selection_report.json",
                  {"budget_words": budget, "selected_words": budget + 7 + seed})
            write(base / "pretrained" / "eval_results.json",
                  {"model_size": "nano", "target_validation_perplexity": 500.0 + 10 * seed + 50 * bool(sub),
                   "target_validation_word_perplexity": 900.0 + 20 * seed + 50 * bool(sub)})


def test_table_over_seeds_has_the_mean_and_sample_std(tmp_path):
    run_dirs = [tmp_path / f"run{seed}" for seed, *_ in RUNS]
    for run_dir, (seed, *accuracies) in zip(run_dirs, RUNS):
        fake_run(run_dir, seed, accuracies)
    summarize_runs.main([str(d) for d in run_dirs] + ["--output_dir", str(tmp_path / "results")])

    with open(tmp_path / "results" / "table.csv") as handle:
        table = {row["variant"]: row for row in csv.DictReader(handle)}
    for column, variant in enumerate(("selective pre-training", "random pre-training", "no pre-training"), 1):
        accuracies = [run[column] for run in RUNS]
        row = table[variant]
        assert int(row["seeds"]) == 3 and row["model_size"] == "nano" and int(row["budget_words"]) == 1000
        assert float(row["test_accuracy_mean"]) == pytest.approx(sum(accuracies) / 3)
        assert float(row["test_accuracy_std"]) == pytest.approx(statistics.stdev(accuracies))
        assert float(row["val_accuracy_mean"]) == pytest.approx(sum(accuracies) / 3 + 0.01)
    assert float(table["no pre-training"]["pretraining_words"]) == 0
    assert float(table["random pre-training"]["pretraining_words"]) == 1008
    assert float(table["selective pre-training"]["target_perplexity_mean"]) == pytest.approx(510.0)
    assert float(table["selective pre-training"]["target_word_perplexity_mean"]) == pytest.approx(920.0)
    assert float(table["selective pre-training"]["target_word_perplexity_std"]) == pytest.approx(20.0)
    assert table["no pre-training"]["target_perplexity_mean"] == ""

    markdown = (tmp_path / "results" / "table.md").read_text()
    assert "| seeds | target perplexity per word | target perplexity per token | val accuracy |" in markdown
    assert "| nano | 1,000 | selective pre-training | all, last token | 3 | 920.0 ± 20.0 | 510.0 ± 10.0 | " \
        "0.7200 ± 0.0265 | 0.7100 ± 0.0265 |" in markdown
    with open(tmp_path / "results" / "runs.csv") as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 9 and {r["seed"] for r in runs} == {"0", "1", "2"}
    assert (tmp_path / "results" / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unfinished_run_is_reported_but_not_averaged(tmp_path, capsys):
    fake_run(tmp_path / "done", 0, RUNS[0][1:])
    (tmp_path / "started" / "selected").mkdir(parents=True)
    summarize_runs.main([str(tmp_path / "done"), str(tmp_path / "started"), "--output_dir", str(tmp_path / "out")])
    output = capsys.readouterr().out
    assert "| selective pre-training | 0 | n/a | n/a | n/a | n/a | n/a | n/a |  |" in output
    assert "| selective pre-training | 1,007 | 900.0 | 500.0 | 0.7100 | 0.7000 | 3.990 | 1e-05 | domain_classifier + " \
        "finetune |" in output
    with open(tmp_path / "out" / "table.csv") as handle:
        assert all(row["seeds"] == "1" for row in csv.DictReader(handle))


def test_a_missing_run_directory_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_stage(summarize_runs.main, [str(tmp_path / "no_such_run")], timed=False)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'no_such_run'}: not a directory (expected a " \
                                             "pipeline run directory)"


def test_language_modelling_runs_show_perplexity_and_next_word_accuracy(tmp_path, capsys):
    for seed, perplexities in ((0, (80.0, 95.0, 140.0)), (1, (84.0, 97.0, 150.0))):
        run_dir = tmp_path / f"run{seed}"
        for sub, perplexity in zip(("", "baselines/random", "baselines/scratch"), perplexities):
            write((run_dir / sub if sub else run_dir) / "finetune" / "results.json", {
                "task": "lm", "seed": seed, "test_perplexity": perplexity, "test_word_perplexity": 2 * perplexity,
                "test_next_token_accuracy": 0.3,
                "test_next_word_accuracy": 10 / perplexity, "composed_epsilon": 4.0, "delta": 1e-5,
                "ledger_stages": ["finetune"], "dp_releases": ["finetune"], "train_examples": 2000})
    summarize_runs.main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--output_dir", str(tmp_path / "out")])
    summary = (tmp_path / "run0" / "summary.md").read_text()
    assert "| variant | pre-training words | target perplexity per word | target perplexity per token | " \
        "test perplexity per word | test perplexity per token | test next-token accuracy |" in summary
    assert "| selective pre-training | 0 | n/a | n/a | 160.0 | 80.0 | 0.3000 | 0.1250 | 4.000 |" in summary
    assert "2,000 private training examples" in summary and summary.split("\n", 2)[2] in capsys.readouterr().out
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| no pre-training | all | 2 | n/a | n/a | 290.0 ± 14.1 | 145.0 ± 7.1 |" in table
    assert (tmp_path / "out" / "word_perplexity_vs_tokens.png").exists()


def test_a_learning_curve_is_grouped_by_tokens_seen_and_counts_no_pre_training_once_per_seed(tmp_path):
    """Runs of two pre-training lengths over two seeds: one row per length; each run repeats the no-pre-training
    baseline of its seed, and the repeats are averaged within the seed, which counts once."""
    run_dirs = []
    for tokens in (2_000_000, 8_000_000):
        for seed in (0, 1):
            run_dir = tmp_path / f"micro_{tokens}_seed{seed}"
            gain = 0.05 * (tokens == 8_000_000)
            repeat = 0.02 * (tokens == 8_000_000)  # the same experiment, another draw of the secret sampling
            fake_run(run_dir, seed, (0.60 + gain + 0.01 * seed, 0.58 + 0.01 * seed, 0.55 + 0.01 * seed + repeat))
            for sub in ("", "baselines/random"):
                base = run_dir / sub if sub else run_dir
                evaluation = json.loads((base / "pretrained" / "eval_results.json").read_text())
                write(base / "pretrained" / "eval_results.json", {**evaluation, "tokens_seen": tokens})
                write(base / "linear_probe" / "linear_probe.json",
                      {"val_accuracy_last_token": 0.6 + gain, "val_accuracy_mean_pooled": 0.62})
                results = json.loads((base / "finetune" / "results.json").read_text())
                write(base / "finetune" / "results.json", {**results, "test_majority_share": 0.56})
            run_dirs.append(run_dir)
    summarize_runs.main([str(d) for d in run_dirs] + ["--output_dir", str(tmp_path / "curve")])

    with open(tmp_path / "curve" / "table.csv") as handle:
        table = {(row["variant"], row["pretraining_tokens"]): row for row in csv.DictReader(handle)}
    assert list(table) == [("selective pre-training", "2000000"), ("selective pre-training", "8000000"),
                           ("random pre-training", "2000000"), ("random pre-training", "8000000"),
                           ("no pre-training", "0")]
    assert int(table["no pre-training", "0"]["seeds"]) == 2  # four runs, two seeds
    # seed 0: mean of 0.55 and 0.57; seed 1: of 0.56 and 0.58; the spread is over the two seeds' means
    assert float(table["no pre-training", "0"]["test_accuracy_mean"]) == pytest.approx(0.565)
    assert float(table["no pre-training", "0"]["test_accuracy_std"]) == pytest.approx(statistics.stdev([0.56, 0.57]))
    assert float(table["selective pre-training", "8000000"]["test_accuracy_mean"]) == pytest.approx(0.655)
    assert float(table["selective pre-training", "8000000"]["probe_last_token_mean"]) == pytest.approx(0.65)
    markdown = (tmp_path / "curve" / "table.md").read_text()
    assert "| model | budget (words) | tokens seen | variant | fine-tuned |" in markdown
    assert "probe, last token (not private)" in markdown and "test majority share" in markdown
    assert "| nano | 1,000 | 8,000,000 | selective pre-training | all, last token | 2 | 910.0 ± 14.1 | 505.0 ± 7.1 | " \
        "0.6650 ± 0.0071 | 0.6550 ± 0.0071 |" \
        in markdown
    assert (tmp_path / "curve" / "accuracy_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert summarize_runs.is_learning_curve(summarize_runs.aggregate(summarize_runs.summary_rows(run_dirs[0]))) is False


def test_runs_fine_tuned_differently_are_never_averaged_together(tmp_path):
    for seed, accuracies in ((0, (0.61, 0.60, 0.59)), (1, (0.57, 0.57, 0.57))):
        fake_run(tmp_path / f"run{seed}", seed, accuracies)
    for sub in ("", "baselines/random", "baselines/scratch"):
        path = tmp_path / "run0" / sub / "finetune" / "results.json"
        write(path, {**json.loads(path.read_text()), "freeze": "body", "pooling": "mean"})
    summarize_runs.main([str(tmp_path / "run0"), str(tmp_path / "run1"), "--output_dir", str(tmp_path / "results")])
    with open(tmp_path / "results" / "table.csv") as handle:
        table = {(row["variant"], row["finetuning"]): row for row in csv.DictReader(handle)}
    assert len(table) == 6 and all(int(row["seeds"]) == 1 for row in table.values())
    assert float(table["selective pre-training", "head, mean-pooled"]["test_accuracy_mean"]) == pytest.approx(0.61)
    assert float(table["selective pre-training", "all, last token"]["test_accuracy_mean"]) == pytest.approx(0.57)
    assert summarize_runs.finetuning_of({"task": "lm", "lora_r": 4}) == "LoRA r4"
    assert summarize_runs.finetuning_of({"freeze": "embeddings"}) == "all but embeddings, last token"


def test_the_plot_puts_no_pre_training_left_of_the_shortest_length_on_a_log_axis():
    position = summarize_runs.x_positions({0, 1_003_520, 4_001_792, 16_003_072})
    assert position[0] == pytest.approx(1_003_520 / 4)  # a factor of 4 (0.6 decades) left of the shortest
    assert [position[n] for n in (1_003_520, 4_001_792, 16_003_072)] == [1_003_520, 4_001_792, 16_003_072]
    assert summarize_runs.x_positions({0}) == {0: 1.0}
    assert [summarize_runs.short_count(n) for n in (0, 950, 12_000, 1_003_520, 1_500_000, 16_003_072)] \
        == ["none", "950", "12k", "1M", "1.5M", "16M"]


def test_the_summary_shows_split_sizes_the_classifier_and_the_sources(tmp_path):
    fake_run(tmp_path / "run", 0, RUNS[0][1:])
    write(tmp_path / "run" / "finetune" / "results.json", {
        **json.loads((tmp_path / "run" / "finetune" / "results.json").read_text()), "train_examples": 900,
        "eval_examples": {"validation": 100, "test": 120}})
    write(tmp_path / "run" / "domain_classifier" / "classifier" / "validation.json", {"val_auc": 0.8123,
                                                                                       "val_accuracy": 0.75})
    write(tmp_path / "run" / "selected" / "selection_report.json", {
        "budget_words": 1000, "selected_words": 1007, "corpus_source_share": {"novels": 0.8, "chat": 0.2},
        "selection_source_share": {"novels": 0.4, "chat": 0.6}, "share_ratio": {"novels": 0.5, "chat": 3.0}})
    write(tmp_path / "run" / "baselines" / "random" / "selected" / "selection_report.json", {
        "budget_words": 1000, "selected_words": 1008, "selection_source_share": {"novels": 0.79, "chat": 0.21}})
    summarize_runs.main([str(tmp_path / "run")])
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "on 900 private training examples (see --train_fraction), evaluated on 100 validation and 120 " \
        "test" in summary
    assert "validation AUC 0.812, accuracy 0.750" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| chat |") or line.startswith("| novels |")]
    assert rows == ["| chat | 0.200 | 0.600 | 0.210 | 3.00 |", "| novels | 0.800 | 0.400 | 0.790 | 0.50 |"]


def test_the_summary_prints_each_audited_stage_beside_its_accountant(tmp_path):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "audit.json").write_text(json.dumps({
        "canaries": 1000, "guesses": 200, "correct": 130, "epsilon_lower_bound": 0.412, "confidence": 0.95,
        "accountant_epsilon": 3.1, "delta": 1e-5}))
    assert summarize_runs.audit_lines(str(tmp_path)) == (
        "Audit of the selective fine-tuning (1000 white-box canaries, 130 of 200 guesses right): epsilon at least "
        "0.412 at 95% confidence, against the accountant's 3.100 at delta 1e-05 (finetune/audit.json).")
    assert summarize_runs.audit_lines(str(tmp_path / "none")) == ""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipeline(*args):
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), *args],
                               capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    return run_dir, pipeline("--preset", "smoke", "--run_dir", str(run_dir))


def test_smoke_pipeline_end_to_end(smoke_run):
    run_dir, output = smoke_run
    for path in ("sentences/stats.json", "classifier_data/filter_train_nonewline.json",
                 "domain_classifier/classifier/classifier.json", "domain_classifier/scores/complete.json",
                 "selected/selection_report.json", "selected/selection_report.png", "pretrained/eval_results.json",
                 "pretrained/loss.png", "finetune/results.json", "finetune/privacy.json",
                 "baselines/random/finetune/results.json", "baselines/scratch/finetune/results.json"):
        assert (run_dir / path).exists(), path
    results = json.loads((run_dir / "finetune" / "results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and 0 <= results["val_accuracy"] <= 1
    assert results["ledger_stages"] == ["domain_classifier", "finetune"]
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert [e["stage"] for e in ledger["entries"]] == ["domain_classifier", "finetune"]
    assert 3.9 <= results["composed_epsilon"] <= 4.0 and results["epsilon"] < results["composed_epsilon"]
    baseline = json.loads((run_dir / "baselines" / "random" / "finetune" / "results.json").read_text())
    assert baseline["ledger_stages"] == ["finetune"] and 3.9 <= baseline["composed_epsilon"] <= 4.0
    assert "| selective pre-training |" in output and "| no pre-training |" in output


def test_completed_stages_are_skipped(smoke_run):
    run_dir, _ = smoke_run
    before = (run_dir / "finetune" / "results.json").stat().st_mtime_ns
    output = pipeline("--preset", "smoke", "--run_dir", str(run_dir))
    assert output.count("nothing to do") >= 7 and "training skipped" in output
    assert (run_dir / "finetune" / "results.json").stat().st_mtime_ns == before


def test_force_reruns_and_until_stops(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "sentences").mkdir(parents=True)
    (run_dir / "sentences" / "stats.json").write_text("{}")  # a stale "complete" output
    output = pipeline("--preset", "smoke", "--run_dir", str(run_dir), "--force", "--until", "1")
    assert "stopping after stage 1" in output
    assert json.loads((run_dir / "sentences" / "stats.json").read_text())["sentences"] > 1000
    assert not (run_dir / "classifier_data").exists()


def test_unknown_preset_is_refused():
    completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", "run_pipeline.sh"), "--preset", "huge"],
                               capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 2 and "unknown preset 'huge'" in completed.stderr

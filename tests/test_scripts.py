"""Every Python script in scripts/ runs from the repository root exactly as the README writes it; every shell
script prints its usage."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "scripts", "*.py")))


SHELL_SCRIPTS = ("run_pipeline.sh", "reproduce_table.sh", "train_domain_classifier.sh", "pretraining.sh",
                 "train_sst2.sh", "test.sh", "gpu_check.sh")


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_print_their_usage(script, tmp_path):
    for flag in ("--help", "-h"):  # from another directory too: nothing is set up, nothing runs
        completed = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), flag], cwd=tmp_path,
                                   capture_output=True, text=True, timeout=60)
        assert completed.returncode == 0 and f"bash scripts/{script}" in completed.stdout, completed.stderr
        assert not os.listdir(tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_from_the_repository_root(script):
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=environment, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "usage:" in completed.stdout


def test_engine_benchmark_runs_a_tiny_configuration():
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    completed = subprocess.run([sys.executable, "scripts/benchmark_engine.py", "--seq_lens", "16", "--batch_size", "4",
                                "--repeats", "1", "--width", "32", "--layers", "1", "--vocab_size", "64",
                                "--variants", "non-private", "this engine"], cwd=ROOT, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    rows = [line.split(" | ") for line in completed.stdout.splitlines() if line.startswith("| 16 | this engine |")]
    assert len(rows) == 4  # per model: its ratio row and its phases (forward, backward, the engine's four, ...)
    phases = [row for row in rows if len(row) == 10]
    assert len(phases) == 2
    for row in phases:
        forward, backward, *engine_phases = (float(cell.strip(" |")) for cell in row[2:8])
        assert sum(engine_phases) <= backward + len(engine_phases)  # the four phases are within the backward (ms)


@pytest.mark.slow
def test_gpu_check_runs_a_tiny_configuration_on_the_cpu():
    """scripts/gpu_check.sh --tiny: the GPU check's table on the CPU, so that the prepared script keeps working."""
    completed = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    rows = [line for line in completed.stdout.splitlines() if line.startswith("| LM head") or
            line.startswith("| sequence classification")]
    assert len(rows) == 6 and all(row.endswith("| ok |") for row in rows)
    assert completed.stdout.count("| 16 | this engine |") == 4  # per model: the ratio row and the phases row


def test_the_tree_is_lint_clean():
    completed = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "."], cwd=ROOT, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]


def test_no_module_outside_the_tests_edits_the_import_path():
    """The packages are installed (pip install -e .): stage scripts import them as they are, from any directory."""
    sources = [path for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
               if not os.path.relpath(path, ROOT).startswith((".venv", "tests", "runs"))]
    assert sources and not [path for path in sources if "sys.path.insert" in open(path).read()]

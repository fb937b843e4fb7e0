"""The privacy ledger of a run directory: every DP release made on the same private data.

    python -m dp_finetuning.privacy_ledger RUN_DIR [--delta D]

prints each release (stage, run id, time, mechanism, its own epsilon) and the epsilon
of their composition (PRV, PLD and RDP composition of the different mechanisms, not a
sum of epsilons). Every DP run appends one entry when it releases its model; a resumed
run finishing keeps its run id and so replaces its own entry instead of adding one.

One delta rule everywhere: the composition is taken at the smallest delta among the
entries (`composition_delta`), in this command, in stage 6's results.json and in the
pipeline's summary.
"""

import argparse
import json
import os
import time

from dp_finetuning.accounting import Mechanism, compute_epsilons
from common.atomic_io import write_json

LEDGER_NAME = "privacy_ledger.json"
# Beside every output that depends on DP releases (scores, selection, pre-trained model, fine-tuned model):
# the list of those releases, so that a later DP stage can check its ledger counts them.
RELEASES_NAME = "dp_releases.json"


def ledger_path(run_dir):
    return os.path.join(run_dir, LEDGER_NAME)


def load_entries(run_dir):
    path = ledger_path(run_dir)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return json.load(handle)["entries"]


def record(run_dir, stage, run_id, mechanism, delta, private_data, release=None, dp_randomness="secret"):
    """Append the entry of release `run_id` (or replace it: the same run finishing again after a resume)."""
    entries = [e for e in load_entries(run_dir) if e.get("run_id") != run_id]
    entries.append({"stage": stage, "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "private_data": private_data, "delta": delta, **mechanism.as_dict(), "release": release,
                    "dp_randomness": dp_randomness})
    write_json(ledger_path(run_dir), {"entries": entries})


def forget(run_dir, release):
    """Remove the entries of the release written at `release` (its model is deleted to be made again)."""
    entries = load_entries(run_dir)
    kept = [e for e in entries if e.get("release") != release]
    if len(kept) != len(entries):
        write_json(ledger_path(run_dir), {"entries": kept})


def composition_delta(entries):
    """The delta at which releases compose: the smallest of their deltas."""
    return min(e["delta"] for e in entries)


def composed_epsilon(run_dir, delta=None):
    """(epsilons per accountant, delta used) of all entries composed; delta by `composition_delta` unless given."""
    entries = load_entries(run_dir)
    if not entries:
        raise FileNotFoundError(f"no privacy ledger entries in {ledger_path(run_dir)}")
    delta = delta if delta is not None else composition_delta(entries)
    return compute_epsilons([Mechanism.from_dict(e) for e in entries], delta), delta


def release_of(privacy_report):
    """What identifies a release in `dp_releases.json`: from its privacy.json."""
    return {key: privacy_report[key] for key in ("stage", "run_id", "private_data", "ledger")}


def read_releases(directory):
    """The DP releases that the output in `directory` depends on ([] where none are recorded)."""
    path = os.path.join(directory, RELEASES_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return json.load(handle)["dp_releases"]


def write_releases(directory, releases):
    write_json(os.path.join(directory, RELEASES_NAME), {"dp_releases": releases})


def check_counted(releases, run_dir, private_data):
    """Refuse to train on `private_data` from an input that depends on a DP release on the same data that the
    ledger of `run_dir` does not hold: that release's epsilon would be left out of the composition."""
    counted = {e.get("run_id") for e in load_entries(run_dir)}
    missing = [r for r in releases if r["private_data"] == private_data and r["run_id"] not in counted]
    if missing:
        names = ", ".join(f"{r['stage']} {r['run_id'][:8]} (ledger {r['ledger']})" for r in missing)
        raise ValueError(f"the input depends on DP releases on {private_data!r} that the ledger in {run_dir} does "
                         f"not hold: {names}; use --run_dir with their ledger, or an input built from public data "
                         "only, so that the reported epsilon covers every release")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--delta", type=float, default=None, help="default: the smallest delta of the entries")
    args = parser.parse_args()
    if not load_entries(args.run_dir):
        parser.exit(2, f"error: {ledger_path(args.run_dir)}: no privacy ledger entries there\n")
    epsilons, delta = composed_epsilon(args.run_dir, args.delta)
    print("| stage | run id | time | private data | noise multiplier | sample rate | steps | sampling | delta | "
          "epsilon alone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in load_entries(args.run_dir):
        alone = compute_epsilons([Mechanism.from_dict(e)], e["delta"])["epsilon"]
        print(f"| {e['stage']} | {e.get('run_id', 'n/a')[:8]} | {e.get('time', 'n/a')} | {e['private_data']} | "
              f"{e['noise_multiplier']:.4g} | {e['sample_rate']:.4g} | {e['steps']} | {e['sampling']} | "
              f"{e['delta']:.3g} | {alone:.3f} |")
    print(f"\ncomposed epsilon of {len(load_entries(args.run_dir))} releases at delta={delta:.3g}: " + ", ".join(
        f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in epsilons.items()))


if __name__ == "__main__":
    main()

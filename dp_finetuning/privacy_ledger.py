"""The privacy ledger of a run directory: every DP stage that touched the same private data.

    python -m dp_finetuning.privacy_ledger RUN_DIR [--delta D]

prints each stage's mechanism and the epsilon of their composition (PRV, PLD and RDP
composition of the different mechanisms, not a sum of epsilons).
"""

import argparse
import json
import os

from dp_finetuning.accounting import Mechanism, compute_epsilons
from dp_finetuning.atomic_io import write_json

LEDGER_NAME = "privacy_ledger.json"


def ledger_path(run_dir):
    return os.path.join(run_dir, LEDGER_NAME)


def load_entries(run_dir):
    path = ledger_path(run_dir)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return json.load(handle)["entries"]


def record(run_dir, stage, mechanism, delta, private_data):
    """Add or replace (a resumed or rerun stage) the entry of `stage`."""
    entries = [e for e in load_entries(run_dir) if e["stage"] != stage]
    entries.append({"stage": stage, "private_data": private_data, "delta": delta, **mechanism.as_dict()})
    write_json(ledger_path(run_dir), {"entries": entries})


def composed_epsilon(run_dir, delta=None):
    """(epsilons per accountant, delta used) of all entries composed; delta defaults to the smallest entry's."""
    entries = load_entries(run_dir)
    if not entries:
        raise FileNotFoundError(f"no privacy ledger entries in {ledger_path(run_dir)}")
    delta = delta if delta is not None else min(e["delta"] for e in entries)
    mechanisms = [Mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"], e["sampling"]) for e in entries]
    return compute_epsilons(mechanisms, delta), delta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--delta", type=float, default=None)
    args = parser.parse_args()
    epsilons, delta = composed_epsilon(args.run_dir, args.delta)
    print("| stage | private data | noise multiplier | sample rate | steps | sampling |")
    print("|---|---|---|---|---|---|")
    for e in load_entries(args.run_dir):
        print(f"| {e['stage']} | {e['private_data']} | {e['noise_multiplier']:.4g} | {e['sample_rate']:.4g} | "
              f"{e['steps']} | {e['sampling']} |")
    print(f"\ncomposed epsilon at delta={delta:.3g}: " + ", ".join(
        f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in epsilons.items()))


if __name__ == "__main__":
    main()

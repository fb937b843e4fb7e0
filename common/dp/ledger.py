"""The privacy ledger of a run directory: every DP release made on the same private data.

    python -m common.dp.ledger RUN_DIR [--delta D]

prints each release (stage, run id, time, mechanism, its own epsilon, whether it is counted)
and the epsilon of the composition of the counted ones (PRV, PLD and RDP composition of the
different mechanisms, not a sum of epsilons). Every DP run appends one entry when it releases
its model; a resumed run finishing keeps its run id and so replaces its own entry instead of
adding one.

Append-only. Entries are never removed. A release is counted while it, or anything derived
from it, exists: a `privacy.json` or `dp_releases.json` under the ledger's directory (or under
the release's own directory) names its run id, or its release directory exists without naming
another run (a release being written), or the entry does not say where its release is. A
release whose model and every output derived from it were deleted (`--redo_changed`, the
pipeline's `--force`) stays in the history as superseded; the command also prints the
composition of every release ever recorded, the figure to cite if a deleted release had been
shared. Writes are atomic and serialised by a lock file, so concurrent stages never lose an
entry.

One delta rule everywhere: the composition is taken at the smallest delta among the counted
entries (`composition_delta`), in this command, in stage 6's results.json and in the
pipeline's summary.
"""

import argparse
import contextlib
import fcntl
import glob
import json
import os
import time
from typing import Optional

from common.atomic_io import write_json
from common.dp.accounting import Mechanism, compute_epsilons

LEDGER_NAME = "ledger.json"
# Beside every output that depends on DP releases (scores, selection, pre-trained model, fine-tuned model):
# the list of those releases, so that a later DP stage can check its ledger counts them.
RELEASES_NAME = "dp_releases.json"
PRIVACY_REPORT_NAME = "privacy.json"


def ledger_path(run_dir: str) -> str:
    return os.path.join(run_dir, LEDGER_NAME)


def load_entries(run_dir: str) -> list:
    """Every entry ever recorded in the ledger of `run_dir` (the history, superseded ones included)."""
    path = ledger_path(run_dir)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return json.load(handle)["entries"]


@contextlib.contextmanager
def _locked(run_dir):
    """An exclusive lock on the ledger of `run_dir` for a read-modify-write."""
    os.makedirs(run_dir, exist_ok=True)
    with open(ledger_path(run_dir) + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unit_of(entry: dict) -> str:
    """A release's privacy unit, with the column that named it: 'example', 'sender (column author)'."""
    unit = entry.get("privacy_unit", "example")
    return f"{unit} (column {entry['unit_column']})" if entry.get("unit_column") else unit


def check_unit(run_dir: str, private_data: str, privacy_unit: str, unit_column: Optional[str] = None) -> None:
    """Refuse a release on `private_data` at another privacy unit (or one read from another column) than the counted
    releases on it already in the ledger: an epsilon per sender and one per message do not compose into either."""
    mine = unit_of({"privacy_unit": privacy_unit, "unit_column": unit_column})
    others = sorted({unit_of(e) for e in counted_entries(run_dir) if e["private_data"] == private_data} - {mine})
    if others:
        raise ValueError(f"the ledger in {run_dir} holds releases on {private_data!r} per {', '.join(others)}, and "
                         f"releases per {mine} would not compose with them; use another run directory "
                         "(--run_dir) or the same unit for every stage")


def record(run_dir: str, stage: str, run_id: str, mechanism: Mechanism, delta: float, private_data: str,
           release: Optional[str] = None, dp_randomness: str = "secret", adjacency: Optional[str] = None,
           privacy_unit: str = "example", unit_column: Optional[str] = None) -> None:
    """Append the entry of release `run_id` (or replace it: the same run finishing again after a resume)."""
    with _locked(run_dir):
        check_unit(run_dir, private_data, privacy_unit, unit_column)
        entries = [e for e in load_entries(run_dir) if e.get("run_id") != run_id]
        entries.append({"stage": stage, "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "private_data": private_data, "delta": delta, **mechanism.as_dict(), "release": release,
                        "dp_randomness": dp_randomness, "privacy_unit": privacy_unit, "adjacency": adjacency,
                        **({"unit_column": unit_column} if unit_column else {})})
        write_json(ledger_path(run_dir), {"entries": entries})


def _run_ids_named_in(path):
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (OSError, ValueError):
        return set()
    if os.path.basename(path) == RELEASES_NAME:
        return {r.get("run_id") for r in content.get("dp_releases", [])}
    return {content.get("run_id")}


def _references(directory):
    """The run ids named by every privacy.json and dp_releases.json under `directory`."""
    named = set()
    for root, _, files in os.walk(directory):
        for name in (PRIVACY_REPORT_NAME, RELEASES_NAME):
            if name in files:
                named |= _run_ids_named_in(os.path.join(root, name))
    return named


def counted_flags(run_dir: str, entries: Optional[list] = None) -> list:
    """For each entry of the ledger (or of `entries`), whether it is counted (module docstring)."""
    entries = load_entries(run_dir) if entries is None else entries
    named = _references(run_dir)
    flags = []
    for entry in entries:
        release = entry.get("release")
        counted = release is None or entry.get("run_id") in named  # a release of unknown place always counts
        if not counted and os.path.isdir(release):
            in_release = _references(release)
            counted = entry.get("run_id") in in_release or not in_release  # named there, or still being written
        flags.append(counted)
    return flags


def counted_entries(run_dir: str) -> list:
    """The entries that compose: the releases that exist or have outputs derived from them."""
    entries = load_entries(run_dir)
    return [entry for entry, counted in zip(entries, counted_flags(run_dir, entries)) if counted]


def composition_delta(entries) -> float:
    """The delta at which releases compose: the smallest of their deltas."""
    return min(e["delta"] for e in entries)


def composed_epsilon(run_dir: str, delta: Optional[float] = None) -> tuple:
    """(epsilons per accountant, delta used) of the counted entries composed; delta by `composition_delta` unless
    given."""
    entries = counted_entries(run_dir)
    if not entries:
        raise FileNotFoundError(f"no counted privacy ledger entries in {ledger_path(run_dir)}")
    delta = delta if delta is not None else composition_delta(entries)
    return compute_epsilons([Mechanism.from_dict(e) for e in entries], delta), delta


def ledgers_under(directory: str) -> list:
    """The directories under `directory` (itself included) that hold a privacy ledger."""
    return sorted(os.path.dirname(path) for path in glob.glob(os.path.join(directory, "**", LEDGER_NAME),
                                                              recursive=True))


def composition_of_ledgers(run_dirs: list, private_data: str, noisy_only: bool = False) -> tuple:
    """(epsilons, delta, number of releases) of every counted release on `private_data` in the ledgers of
    `run_dirs` together, each release once (several ledgers may hold the same one, e.g. the domain classifier);
    `noisy_only` leaves out the releases without noise (whose epsilon is infinite)."""
    entries = {}
    for run_dir in run_dirs:
        entries.update({e["run_id"]: e for e in counted_entries(run_dir) if e["private_data"] == private_data
                        and (e["noise_multiplier"] > 0 or not noisy_only)})
    if not entries:
        return None, None, 0
    delta = composition_delta(entries.values())
    return compute_epsilons([Mechanism.from_dict(e) for e in entries.values()], delta), delta, len(entries)


def release_of(privacy_report: dict) -> dict:
    """What identifies a release in `dp_releases.json`: from its privacy.json."""
    return {key: privacy_report[key] for key in ("stage", "run_id", "private_data", "ledger")}


def read_releases(directory: str) -> list:
    """The DP releases that the output in `directory` depends on ([] where none are recorded)."""
    path = os.path.join(directory, RELEASES_NAME)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return json.load(handle)["dp_releases"]


def write_releases(directory: str, releases: list) -> None:
    write_json(os.path.join(directory, RELEASES_NAME), {"dp_releases": releases})


def check_counted(releases: list, run_dir: str, private_data: str) -> None:
    """Refuse to train on `private_data` from an input that depends on a DP release on the same data that the
    ledger of `run_dir` does not hold: that release's epsilon would be left out of the composition."""
    counted = {e.get("run_id") for e in counted_entries(run_dir)}
    missing = [r for r in releases if r["private_data"] == private_data and r["run_id"] not in counted]
    if missing:
        names = ", ".join(f"{r['stage']} {r['run_id'][:8]} (ledger {r['ledger']})" for r in missing)
        raise ValueError(f"the input depends on DP releases on {private_data!r} that the ledger in {run_dir} does "
                         f"not hold: {names}; use --run_dir with their ledger, or an input built from public data "
                         "only, so that the reported epsilon covers every release")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--delta", type=float, default=None, help="default: the smallest delta of the counted entries")
    args = parser.parse_args()
    entries = load_entries(args.run_dir)
    if not entries:
        parser.exit(2, f"error: {ledger_path(args.run_dir)}: no privacy ledger entries there\n")
    print("| stage | run id | time | private data | unit | noise multiplier | sample rate | steps | sampling | delta | "
          "epsilon alone | counted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for e, counted in zip(entries, counted_flags(args.run_dir, entries)):
        alone = compute_epsilons([Mechanism.from_dict(e)], e["delta"])["epsilon"]
        print(f"| {e['stage']} | {e.get('run_id', 'n/a')[:8]} | {e.get('time', 'n/a')} | {e['private_data']} | "
              f"{unit_of(e)} | {e['noise_multiplier']:.4g} | {e['sample_rate']:.4g} | "
              f"{e['steps']} | {e['sampling']} | "
              f"{e['delta']:.3g} | {alone:.3f} | {'yes' if counted else 'superseded'} |")
    counted = counted_entries(args.run_dir)
    if not counted:
        print("\nno counted release: every release in this ledger was deleted with all its derived outputs")
        return
    epsilons, delta = composed_epsilon(args.run_dir, args.delta)
    units = "/".join(sorted({unit_of(e) for e in counted}))
    print(f"\ncomposed epsilon per {units} of the {len(counted)} counted releases at delta={delta:.3g}: " + ", ".join(
        f"{name} {'n/a' if value is None else f'{value:.3f}'}" for name, value in epsilons.items()))
    if len(counted) < len(entries):  # if a superseded release was ever shared, this is the figure to cite
        every_delta = composition_delta(entries)
        every = compute_epsilons([Mechanism.from_dict(e) for e in entries], every_delta)["epsilon"]
        print(f"every release ever recorded here ({len(entries)}, superseded ones included, as if all had been "
              f"seen): epsilon {every:.3f} at delta={every_delta:.3g}")


if __name__ == "__main__":
    main()

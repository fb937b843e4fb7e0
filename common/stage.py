"""What every stage script shares: one-line errors, the signature of a stage's output, its wall time.

Errors. `run_stage(main)` runs a script's `main()`. The project's own errors (`DataError`: bad
data, bad arguments, corrupted or foreign checkpoints) end the script with one line
`error: <message>` on stderr and exit code 2, and an output directory that this failed run
created is removed, so nothing half-written is left. `SELECTIVE_PRETRAINING_DEBUG=1` shows the
traceback instead. Any other exception is a bug and keeps its traceback.

Signatures. A stage's output directory holds `stage_signature.json`: the settings that determine
it (the script's flags, less those that only say where or how fast) and a fingerprint of every
input path (an upstream stage's output is fingerprinted by its own signature, which carries a
fresh id each time that stage is made, so a remade input is a changed input; any other path by
a hash of its files' sizes and times keyed with a secret of the user's, so that a signature in a
release never tells the size of a private file). A rerun with the
same signature skips a complete output or resumes a partial one; with another signature it
stops with one line naming what differs, unless `--redo_changed` is given, which deletes the
old output and makes it afresh (a DP release deleted so stays in the run's privacy ledger,
counted while any output derived from it exists: `common/dp/ledger.py`). The pipeline
passes `--redo_changed` to every stage, so a changed
setting redoes its stage and, through the fingerprints, every stage downstream of it.
"""

import hashlib
import hmac
import json
import os
import secrets
import shutil
import sys
import time
import uuid

from common.atomic_io import write_json

DEBUG_VARIABLE = "SELECTIVE_PRETRAINING_DEBUG"
FINGERPRINT_KEY_VARIABLE = "SELECTIVE_PRETRAINING_FINGERPRINT_KEY"
SIGNATURE_NAME = "stage_signature.json"
# Flags that say where outputs go, how fast or how often to report: not part of what a stage makes.
NOT_SETTINGS = frozenset({"output_dir", "resume_from_checkpoint", "keep_training_state", "cache_dir",
                          "redo_changed", "num_proc", "logging_steps", "checkpointing_steps", "score_batch_size"})
# Flags added after outputs were made, at the value that does what those outputs did: a signature without the flag
# matches a run that leaves it there, so an upgrade does not make every earlier output "changed".
SETTINGS_ADDED_LATER = {"audit_canaries": 0, "audit_kind": "white-box", "privacy_unit": "example",
                        "unit_column": "sender", "max_examples_per_unit": 8, "target_unit_column": None}
# Path flags recorded by value only: the run directory holds everything, its listing is no input.
NOT_FINGERPRINTED = frozenset({"run_dir"})
# Where a stage works before its output is complete, and where a DP stage keeps its private training state
# (beside the release, never in it); removed with the output they belong to.
WORK_SUFFIXES = (".tmp", ".partial", ".private")


class DataError(ValueError):
    """Bad input: the message names the file or argument and what was expected."""


def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def run_stage(main, argv=None, timed=True):
    """Run a stage's `main(argv)` with one-line errors and (if `timed`) its wall time at the end (module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    output_dir = _flag_value(argv, "--output_dir")
    created = [] if output_dir is None else [
        path for path in (output_dir, *(output_dir.rstrip("/") + s for s in WORK_SUFFIXES)) if not os.path.exists(path)]
    quiet_libraries()
    start = time.perf_counter()
    try:
        main(argv)
    except DataError as error:
        if os.environ.get(DEBUG_VARIABLE):
            raise
        for path in created:
            shutil.rmtree(path, ignore_errors=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    close_process_group()
    if timed and is_main_process():
        print(f"{os.path.basename(sys.argv[0])} finished in {time.perf_counter() - start:.0f} s")


def close_process_group():
    """Under several processes (accelerate launch, torchrun), leave the process group together: a process that
    exits while the group is still alive in another can make that one abort at exit (gloo), failing the launch."""
    distributed = sys.modules.get("torch.distributed")  # never imports torch for a stage that does not use it
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()


def quiet_libraries():
    """Only the project's own progress bars: none of the libraries' bars for every map, save or load."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _flag_value(argv, flag):
    for position, word in enumerate(argv):
        if word == flag and position + 1 < len(argv):
            return argv[position + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def add_redo_argument(parser):
    parser.add_argument("--redo_changed", action="store_true",
                        help="if --output_dir was made with other settings or inputs, delete it and redo this stage "
                             "(default: stop with an error naming what changed)")


def fingerprint_key():
    """The secret key of input fingerprints: created once per user (outside every run directory), never written to
    an output. A plain size and time of a private file would tell its size, which moves with one record."""
    path = os.environ.get(FINGERPRINT_KEY_VARIABLE) or os.path.join(
        os.path.expanduser("~"), ".cache", "selective_pretraining", "fingerprint.key")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # only the first of several processes creates it; every one then reads that key
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    with open(path, "rb") as handle:
        return handle.read()


def fingerprint(path):
    """What identifies the content of an input path, cheaply: a stage output's signature, else a keyed hash of its
    files' sizes and times (which, unkeyed, would tell a private file's size)."""
    signature = os.path.join(path, SIGNATURE_NAME)
    if os.path.isfile(signature):
        with open(signature, "rb") as handle:
            return "signature " + hashlib.sha256(handle.read()).hexdigest()[:16]
    listing = hmac.new(fingerprint_key(), digestmod=hashlib.sha256)
    if os.path.isfile(path):
        status = os.stat(path)
        listing.update(f"{status.st_size} {status.st_mtime_ns}".encode())
        return "file " + listing.hexdigest()[:16]
    for root, directories, files in os.walk(path):
        directories.sort()
        for name in sorted(files):
            status = os.stat(os.path.join(root, name))
            listing.update(f"{os.path.relpath(os.path.join(root, name), path)} {status.st_size} "
                           f"{status.st_mtime_ns}\n".encode())
    return "directory " + listing.hexdigest()[:16]


class StageOutput:
    """The output directory of one stage run with `args` (see the module docstring).

    `complete()`: True if the directory holds a complete output (`marker` exists) made with the
    same signature; False if there is nothing yet, or a partial output of the same signature to
    resume; otherwise an error, or with --redo_changed the old output is deleted and False.
    `claim(directory)`: write the signature into `directory` (default: the output directory),
    when the stage starts to write there. `start(accelerator)`: both, for a stage that writes
    into its output directory as it goes, with several processes.
    """

    def __init__(self, args, marker, work_dir=None):
        self.args, self.marker = args, marker
        self.directory = args.output_dir
        self.work_dir = work_dir  # where a stage that renames its output at the end keeps resumable work
        self.settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
        if self.settings.get("deterministic_dp"):  # then --seed is the DP randomness: never written in the clear
            self.settings["seed"] = "keyed " + hmac.new(fingerprint_key(), str(args.seed).encode(),
                                                        hashlib.sha256).hexdigest()[:16]
        self.inputs = {}
        for name, value in self.settings.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, str) and name not in NOT_FINGERPRINTED and os.path.exists(item):
                    self.inputs[f"--{name} {item}"] = fingerprint(item)

    def start(self, accelerator):
        """complete() on every process (so that an error stops each of them), the removal of a changed output and
        the claim on the main process only; True if the stage can be skipped."""
        main = accelerator.is_main_process
        complete = self.complete(act=main)
        accelerator.wait_for_everyone()
        if not complete and main:
            self.claim()
        return complete

    def complete(self, act=True):
        """Whether the stage can be skipped; stops or redoes on a changed signature (act=False: only says)."""
        directory = self.directory
        if not os.path.exists(directory):
            if self.work_dir is None or not os.path.exists(self.work_dir):
                return False
            directory = self.work_dir
        stored_path = os.path.join(directory, SIGNATURE_NAME)
        if os.path.exists(stored_path):
            with open(stored_path) as handle:
                stored = json.load(handle)
            differences = self.differences(stored)
        elif os.path.exists(os.path.join(directory, self.marker)):
            differences = ["no record of the settings that made it"]
        else:  # begun by hand (a checkpoint copied in to resume from), or empty: nothing to compare
            return False
        if not differences:
            if os.path.exists(os.path.join(directory, self.marker)):
                if act:
                    print(f"{self.directory} is complete; nothing to do")
                return True
            return False
        if not getattr(self.args, "redo_changed", False):
            raise DataError(f"{directory} was made with other settings or inputs: {'; '.join(differences)}. "
                            "Use --redo_changed to redo it (and, in the pipeline, what depends on it), or another "
                            "output directory (the pipeline: another --run_dir, or --force to start afresh)")
        if act:
            print(f"{directory}: {'; '.join(differences)}; redoing it (--redo_changed)")
            self.remove()
        return False

    def differences(self, stored):
        """What differs from a stored signature, one phrase per setting or input."""
        found = []
        old_settings = stored.get("settings", {})
        for name in sorted(set(old_settings) | set(self.settings)):
            old, new = old_settings.get(name, "(unset)"), self.settings.get(name, "(unset)")
            if old == "(unset)" and name in SETTINGS_ADDED_LATER and new == SETTINGS_ADDED_LATER[name]:
                continue
            if old != new:
                found.append(f"--{name} {_shown(old)} -> {_shown(new)}")
        old_inputs = stored.get("inputs", {})
        for name in sorted(set(old_inputs) | set(self.inputs)):
            if name not in self.inputs:
                continue  # the path itself changed, which the settings already say
            if old_inputs.get(name) != self.inputs[name]:
                found.append(f"{name} has changed since")
        return found

    def remove(self):
        """Delete the output and its work directories (a DP release among them stays in the privacy ledger)."""
        for path in (self.directory, self.work_dir, *(self.directory.rstrip("/") + s for s in WORK_SUFFIXES)):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)

    def claim(self, directory=None):
        directory = directory or self.directory
        os.makedirs(directory, exist_ok=True)
        write_json(os.path.join(directory, SIGNATURE_NAME),
                   {"settings": self.settings, "inputs": self.inputs, "made": uuid.uuid4().hex})


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def resolve_checkpoint(resume_from_checkpoint, checkpoints_dir):
    """The checkpoint directory that --resume_from_checkpoint names: a path as given, or with 'latest' the newest
    `checkpoint-N` in `checkpoints_dir` (None if there is none: the stage starts afresh); None without the flag."""
    if resume_from_checkpoint != "latest":
        return resume_from_checkpoint or None
    steps = [int(name.split("-")[1]) for name in (os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else [])
             if name.startswith("checkpoint-") and name.split("-")[1].isdigit()]
    return os.path.join(checkpoints_dir, f"checkpoint-{max(steps)}") if steps else None

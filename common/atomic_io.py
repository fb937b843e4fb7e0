"""Write outputs so that a killed process never leaves a half-written file or directory."""

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; it becomes `path` only if the block finishes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions of a file opened normally, not mkstemp's 0600
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")


@contextlib.contextmanager
def atomic_directory(final_dir):
    """Yield `<final_dir>.tmp` (emptied of what a killed run left) to write a whole output into; it replaces
    `final_dir` only if the block finishes. How every stage ends, so that none leaves a half-written output."""
    tmp_dir = f"{final_dir.rstrip('/')}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    yield tmp_dir
    replace_directory(tmp_dir, final_dir)


def replace_directory(tmp_dir, final_dir):
    """Move a finished `tmp_dir` to `final_dir`, replacing an older one."""
    if os.path.exists(final_dir):
        old = f"{final_dir}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)

"""Write outputs so that a killed process never leaves a half-written file or directory."""

import json
import os
import shutil
import tempfile


def write_json(path, obj):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(obj, handle, indent=2)
        handle.write("\n")
    os.replace(handle.name, path)


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

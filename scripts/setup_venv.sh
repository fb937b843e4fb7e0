# Sourced by the entry scripts: create or reuse .venv, install the pinned requirements and the project itself
# (editable: `pip install -e .`, so that every stage script imports the packages from any directory).
# Installs again only when a requirements file or pyproject.toml changed since the last install.
VENV_DIR=${VENV_DIR:-.venv}
if [ ! -x "$VENV_DIR/bin/python" ]; then
  python3 -m venv "$VENV_DIR"
fi
stamp="$VENV_DIR/.requirements.sha256"
wanted=$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$VENV_DIR/bin/python" -m pip install --quiet -r requirements.txt -r requirements-test.txt
  "$VENV_DIR/bin/python" -m pip install --quiet --no-deps -e .
  echo "$wanted" > "$stamp"
fi
source "$VENV_DIR/bin/activate"

# Sourced by the entry scripts: create or reuse .venv and install the pinned requirements.
# Installs again only when a requirements file changed since the last install.
VENV_DIR=${VENV_DIR:-.venv}
if [ ! -x "$VENV_DIR/bin/python" ]; then
  python3 -m venv "$VENV_DIR"
fi
stamp="$VENV_DIR/.requirements.sha256"
wanted=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$VENV_DIR/bin/python" -m pip install --quiet -r requirements.txt -r requirements-test.txt
  echo "$wanted" > "$stamp"
fi
source "$VENV_DIR/bin/activate"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

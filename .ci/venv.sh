# Sourced by the install scripts with VENV and HERE set: creates the virtual environment if
# missing, installs CPU torch 2.13.0 (every later pip call is held to it by constraints.txt) and
# sets PY (its python) and PIP (a quiet pip install command, as an array).
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0

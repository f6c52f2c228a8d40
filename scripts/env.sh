# Create or refresh the project's virtual environment (.venv) and activate it.
# Sourced by scripts/demo and scripts/test; safe to run again (pip skips what is installed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MIXQ_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.mixq-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/scripts/env.sh" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: on Linux this is the machine's CPU wheel (any other spec may pull a CUDA build).
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[mlx,report,test]"
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

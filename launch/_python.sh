# Sourced by the launchers: the interpreter. $PYTHON, else the active virtualenv's `python`, else this
# checkout's .venv (made by scripts/setup.sh), so a fresh shell that never activated it still finds
# torch and distrib.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -z ${VIRTUAL_ENV:-} && -x "$_root/.venv/bin/python" ]]; then PYTHON="$_root/.venv/bin/python"; else PYTHON=python; fi
fi

#!/usr/bin/env bash
# Code health, exactly as CI (.ci/run) checks it, before the tests: ruff's linter, ruff's formatter (check only) and
# mypy, on pixcell_fed/, site_agent/ and coordinator/, configured in pyproject.toml ([tool.ruff], [tool.mypy]).
#
#   scripts/lint.sh          check; exits 1 when any of the three finds something (nothing is changed)
#   scripts/lint.sh --fix    first apply ruff's safe automatic fixes and the formatter, then check as above
#
# Tools: $RUFF, $MYPY and $PYTHON when set, else .venv/bin/{ruff,mypy,python} (scripts/setup.sh installs the pinned
# versions with the test extra), else whatever is on PATH. mypy reads the project's dependencies through $PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
PATHS=(pixcell_fed site_agent coordinator)

tool() {  # tool NAME ENV_VALUE: the executable to use
  if [[ -n $2 ]]; then echo "$2"
  elif [[ -x .venv/bin/$1 ]]; then echo ".venv/bin/$1"
  elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
  else echo "lint: $1 not found; run scripts/setup.sh (or set ${1^^}=/path/to/$1)" >&2; exit 2
  fi
}

fix=0
case "${1:-}" in
  "") ;;
  --fix) fix=1 ;;
  -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
  *) echo "usage: scripts/lint.sh [--fix]" >&2; exit 2 ;;
esac
RUFF=$(tool ruff "${RUFF:-}") || exit 2
MYPY=$(tool mypy "${MYPY:-}") || exit 2
PYTHON=$(tool python "${PYTHON:-}") || exit 2

if (( fix )); then
  echo "lint: applying ruff's automatic fixes and the formatter" >&2
  "$RUFF" check --fix-only --quiet "${PATHS[@]}" || exit 1
  "$RUFF" format --quiet "${PATHS[@]}" || exit 1
fi

failed=()
echo "lint: ruff check" >&2
"$RUFF" check "${PATHS[@]}" || failed+=("ruff check")
echo "lint: ruff format --check" >&2
"$RUFF" format --check "${PATHS[@]}" || failed+=("ruff format --check (run scripts/lint.sh --fix)")
echo "lint: mypy" >&2
"$MYPY" --python-executable "$PYTHON" || failed+=("mypy")
if (( ${#failed[@]} )); then
  printf 'lint: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "lint: ok (ruff, ruff format, mypy)" >&2

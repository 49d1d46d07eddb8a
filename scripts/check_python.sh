#!/usr/bin/env bash
# Checks that pixcell-fed installs and works on one Python, the way a site installs it, in a fresh virtual
# environment. Run by hand, not by CI: each Python needs PyPI's torch (a CUDA build, about 3 GB with its nvidia-*
# wheels; pip's cache keeps it for the next run).
#
# Usage: scripts/check_python.sh VERSION [--keep]
#   VERSION   3.11, 3.12 or 3.13: python$VERSION on PATH, else ~/.pyenv/versions/$VERSION.*
#   --keep    keep the environment (its path is printed) instead of removing it
#
# Steps (timed):
#   1. a fresh venv; pip talks to PyPI only (the machine's pip configuration, mirrors and constraints are ignored)
#   2. pip install --require-hashes -r requirements/site.lock     (the lock, every file's hash checked)
#   3. pip install --no-deps --no-build-isolation .                (the package itself, as docs/install.md says)
#   4. pip install ".[test,bench]"                                 ('pip install .' on this Python: every dependency
#                                                                    already satisfied, so only pytest and faiss come)
#   5. site-agent doctor's lock check, then the fast test tier against the installed package (the repository's
#      files without the package's source folders):
#      pytest -m "not slow and not gpu" (every test that is not marked slow or gpu, now and as tests are added)
# The last line is one summary: Python, torch, install time and size, the lock check, pytest's result.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

usage() { sed -n '5,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 ]] || usage
version="$1"; shift
keep=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    *) usage ;;
  esac
done

# the first that runs (a pyenv shim on PATH may belong to a version that is not selected)
python=""
for candidate in "$(command -v "python$version" || true)" "$HOME"/.pyenv/versions/"$version".*/bin/python; do
  if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" -c 'import venv' >/dev/null 2>&1; then
    python="$candidate"; break
  fi
done
if [[ -z "$python" ]]; then
  echo "error: no Python $version found (python$version on PATH or ~/.pyenv/versions/$version.*)" >&2
  echo "hint: install it (pyenv install $version) or pass another version" >&2
  exit 2
fi
full="$("$python" -c 'import platform; print(platform.python_version())')"

work="$(mktemp -d "${TMPDIR:-/tmp}/pixcell-fed-py$version.XXXXXX")"
if [[ $keep == 0 ]]; then trap 'rm -rf "$work"' EXIT; fi
venv="$work/venv"
log() { echo "check_python $full: $*" >&2; }

# PyPI only: no configuration file (mirrors, find-links, constraints) and no PIP_* variables of this machine.
for var in $(env | sed -n 's/^\(PIP_[A-Z_]*\)=.*/\1/p'); do unset "$var"; done
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180
# Nothing but the fresh environment on the import path: no PYTHONPATH, and every Python run below starts outside
# the repository ('python -c' and 'python -m' put the current folder first on sys.path).
unset PYTHONPATH
inside() { (cd "$work" && "$@"); }

log "fresh venv in $venv ($python)"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --quiet)
start=$SECONDS
log "pip install --require-hashes -r requirements/site.lock"
"${pip[@]}" install --require-hashes -r requirements/site.lock
log "pip install --no-deps --no-build-isolation ."
"${pip[@]}" install --no-deps --no-build-isolation .
log "pip install \".[test,bench]\""
"${pip[@]}" install ".[test,bench]"
install_s=$((SECONDS - start))
size="$(du -sm "$venv" | cut -f1)"
torch="$(inside "$venv/bin/python" -c 'import torch; print(torch.__version__)')"
installed_at="$(inside "$venv/bin/python" -c 'import pixcell_fed; print(pixcell_fed.__file__)')"
case "$installed_at" in
  "$venv"/*) ;;
  *) echo "error: pixcell_fed is imported from $installed_at, not from the fresh environment" >&2; exit 1 ;;
esac
log "installed in ${install_s} s, ${size} MB, torch $torch; pixcell_fed from $installed_at"

lock_check="$(inside "$venv/bin/python" -c '
from pixcell_fed.doctor import run_doctor
[result] = run_doctor(checks=["lock"]).results
print(f"{result.status}: {result.detail}")')"
log "doctor lock check: $lock_check"

# The installed package is what the tests import: pytest runs in a copy of the repository's files without the
# package's source folders (tests/, benchmarks/, configs/, docs/, ... stay; the tests read some of them).
tree="$work/tree"
mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard \
  | grep -zv -E '^(pixcell_fed|site_agent|coordinator)/' | xargs -0 tar -cf - | tar -C "$tree" -xf -
export PIXCELL_FED_NO_PROGRESS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
unset CI
start=$SECONDS
set +e
(cd "$tree" && "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not gpu" tests) 2>&1 \
  | tee "$work/pytest.log" | tail -n 25 >&2
status=${PIPESTATUS[0]}
set -e
test_s=$((SECONDS - start))
result="$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed).* =+$' "$work/pytest.log" | tail -n 1 | tr -d '=' | xargs)"
[[ $keep == 1 ]] && log "kept $venv"
echo "Python $full (lock install): torch $torch, installed in ${install_s} s, ${size} MB; lock check $lock_check; " \
     "pytest -m 'not slow and not gpu': ${result:-no summary} in ${test_s} s (exit $status)"
exit "$status"

#!/usr/bin/env bash
# Regenerates the hashed locks requirements/site.lock and requirements/coordinator.lock from pyproject.toml.
#
# Every package pixcell-fed needs at run time, and the build backend (so that 'pip install --no-deps
# --no-build-isolation .' installs nothing unhashed), pinned to one version with the sha256 of every file PyPI
# serves for it. Resolved by uv, in a throwaway virtual environment, against PyPI only (no pip configuration, no
# local mirror), universally: one file for CPython 3.11 to 3.13 on every platform, with environment markers where a
# version differs between Pythons. Only files uploaded before LOCK_DATE are considered, so that a rerun with an
# unchanged pyproject.toml gives the same locks; move LOCK_DATE forward to take newer releases.
#
# Usage: scripts/lock.sh            (about a minute; needs PyPI, downloads no torch wheel)
# Then: review the diff, run scripts/check_python.sh on each supported Python, update CHANGELOG.md.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK_DATE="${LOCK_DATE:-2026-12-02T00:00:00Z}"
UV_VERSION="0.13.9"

tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
PIP_CONFIG_FILE=/dev/null "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
# the build backend, from [build-system] requires (one place)
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
  > "$tools/build.in"
version="$(python3 -c 'import ast, re; print(re.search(r"__version__ = \"([^\"]+)\"", open("pixcell_fed/__init__.py").read()).group(1))')"

header() {  # $1: role, $2: what the role runs
  cat <<EOF
# pixcell-fed $version, $1: $2.
# Every package and the sha256 of each of its files on PyPI. Install (docs/install.md):
#     pip install --require-hashes -r requirements/$1.lock
#     pip install --no-deps --no-build-isolation .
# Python: CPython 3.11, 3.12, 3.13 (markers pick each Python's versions). Platform: installed and tested on Linux
# x86_64 only, with and without a GPU; the other platforms' files are listed because PyPI serves them.
# torch: PyPI's torch 2.14.1, which on Linux is the CUDA 13.0 build (with the nvidia-* runtime wheels below, about
# 3 GB); it runs on CPU-only machines too. PyTorch's CPU-only build is not on PyPI and is not in this lock.
# 'site-agent doctor' compares the installed versions with this file (a copy ships inside the package).
# Regenerate with scripts/lock.sh (resolved against PyPI as of $LOCK_DATE); do not edit by hand.
EOF
}

lock() {  # $1: role, $2: what the role runs
  local out="requirements/$1.lock"
  { header "$1" "$2"
    "$tools/venv/bin/uv" pip compile pyproject.toml "$tools/build.in" --no-config --universal --python-version 3.11 \
      --generate-hashes --exclude-newer "$LOCK_DATE" --custom-compile-command "scripts/lock.sh" \
      | sed "s|-r $tools/build.in|pyproject.toml [build-system]|"  # the annotation, without the temporary path
  } > "$out.tmp"
  mv "$out.tmp" "$out"
  echo "lock: wrote $out ($(grep -c '^[A-Za-z0-9]' "$out") pins)" >&2
}

# Both roles install the same package today, so the two files pin the same set; they are separate so that each
# machine's deployment names its own file and a role-specific dependency later changes only that role's lock.
lock site "the site agent (site-agent: tiling, UNI2-h, PixCell synthesis, audit, bundles, SuperNode)"
lock coordinator "the coordinator (coordinator: verification, pooling, training, the SuperLink and its Fleet front)"

#!/usr/bin/env bash
# Sets up (or reuses) .venv with pixcell-fed and its test tools. Idempotent: a second run only checks.
# Installs Debian's chromium (for the audit report's rendering test) and nginx (for the test of the documented
# reverse-proxy configuration of the coordinator's Fleet front) when they are missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.pixcell-fed-installed
want="$(cat pyproject.toml requirements/site.lock | sha256sum | cut -d' ' -f1)"
if [[ ! -x .venv/bin/python ]]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "setup: installing pixcell-fed and its dependencies into .venv (first run takes a few minutes)" >&2
  # exactly what the release pins, every file's hash checked (docs/install.md); pip takes torch 2.14.1 and
  # torchvision 0.29.1 from the machine's local copy where it has one (the same files as PyPI's: same hashes)
  .venv/bin/pip install --quiet --require-hashes -r requirements/site.lock
  .venv/bin/pip install --quiet -e ".[test,bench]"
  echo "$want" > "$stamp"
fi
if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's chromium for the report rendering test" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup: could not install chromium; the report rendering test will fail" >&2
fi
if ! command -v nginx >/dev/null 2>&1 && [[ ! -x /usr/sbin/nginx ]] && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Debian's nginx for the Fleet front's nginx configuration test" >&2
  # RUNLEVEL=1: install only; do not start the distribution's nginx service
  (apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null) \
    || echo "setup: could not install nginx; under CI the nginx configuration test will fail" >&2
fi
# The real H&E slide the demo and the tests write their slides from: cached once, so that nothing fetches it later.
.venv/bin/python -m pixcell_fed.simulation.real_slide >/dev/null

"""Shared by every benchmark: describe the machine, print the figures, and record them in BENCHMARKS.md.

Each benchmark owns one section of BENCHMARKS.md between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``;
rerunning it replaces that section only. The last line printed is one JSON object with all figures.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"

_HEADER = """# Benchmarks

Every figure here was printed by a script under `benchmarks/`, on the machine named in its section.
Rerun one with the command shown; it replaces its own section. Ratios are measured against a baseline in the
same run, because these machines are noisy.
"""


def machine_description() -> str:
    """CPU model, core count, memory and the GPU if any, as one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f", {kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}, Python {platform.python_version()}"


def _summary(text: str) -> str:
    """The summary table: one row per benchmark section, from the JSON record each section carries."""
    rows = ["| benchmark | headline | machine | date | reproduce |", "|---|---|---|---|---|"]
    for match in re.finditer(r"<!-- (\w+):start -->.*?Reproduce: `([^`]*)`.*?```json\n(.*?)\n```", text, re.S):
        figures = json.loads(match.group(3))
        rows.append(f"| {match.group(1)} | {figures.get('headline', '')} | {figures.get('machine', '')} "
                    f"| {figures.get('date', '')} | `{match.group(2)}` |")
    return "<!-- summary:start -->\n## Summary\n\n" + "\n".join(rows) + "\n<!-- summary:end -->\n"


def record(name: str, title: str, command: str, figures: dict, table_md: str, *, headline: str = "") -> None:
    """Print ``figures`` as the last JSON line and replace this benchmark's section of BENCHMARKS.md (unless
    ``figures["quick"]`` marks a smoke-sized run, which is printed only).

    ``headline`` is the one-line result shown in the summary table at the top of BENCHMARKS.md.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figures = {"benchmark": name, "machine": machine_description(), "date": stamp, "headline": headline, **figures}
    if figures.get("quick"):  # a smoke-sized run never replaces the recorded figures
        print(f"(--quick: smoke-sized figures, not recorded in {BENCHMARKS_MD.name})", file=sys.stderr)
        print(json.dumps(figures, sort_keys=True))
        return
    section = (
        f"<!-- {name}:start -->\n## {title}\n\n"
        f"Machine: {figures['machine']}. Date: {stamp}.\n"
        f"Reproduce: `{command}`\n\n{table_md.strip()}\n\n"
        f"```json\n{json.dumps(figures, indent=1, sort_keys=True)}\n```\n<!-- {name}:end -->\n"
    )
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else _HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->\n?", re.S)
    text = pattern.sub(lambda _m: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    summary = re.compile(r"<!-- summary:start -->.*?<!-- summary:end -->\n?", re.S)
    text = summary.sub("", text)
    head, sep, rest = text.partition("<!-- ")
    text = head.rstrip("\n") + "\n\n" + _summary(text) + "\n" + sep + rest
    BENCHMARKS_MD.write_text(text)
    sys.stdout.flush()
    print(json.dumps(figures, sort_keys=True))

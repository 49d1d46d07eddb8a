"""The site's evaluation query budget: how many evaluations one coordinator run, and one UTC day, may ask for.

Kept at the site, in ``<work_dir>/federation/evaluation_queries.json``, under a file lock, so that it holds across
coordinator runs, SuperNode restarts and the fresh process Flower starts for every message. A query is counted
before any real tile is read (fail closed: a query that crashes still counts).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Iterator
from pathlib import Path

from pixcell_fed.atomic import write_json_atomic
from pixcell_fed.federation.protocol import Refusal

FOLDER = "federation"
BUDGET_FILE = "evaluation_queries.json"
KEEP_DAYS = 31
KEEP_RUNS = 1000


def budget_path(work_dir: str | Path) -> Path:
    return Path(work_dir) / FOLDER / BUDGET_FILE


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    if not path.is_file():
        return {"days": {}, "runs": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # a damaged ledger must not reset the budget: refuse until someone looks
        raise Refusal("budget-exhausted", f"{path} is unreadable ({exc}); evaluation stays closed") from exc
    if not isinstance(data, dict) or not isinstance(data.get("days"), dict) or not isinstance(data.get("runs"), dict):
        raise Refusal("budget-exhausted", f"{path} is not an evaluation ledger; evaluation stays closed")
    return data


def charge_query(
    work_dir: str | Path, flower_run: int | str, *, per_run: int, per_day: int, today: _dt.date | None = None
) -> dict[str, int]:
    """Count one evaluation for ``flower_run`` and today, or refuse (``budget-exhausted``) when either is spent.

    Returns the counts after this query: ``{"run": n, "day": n}``.
    """
    path = budget_path(work_dir)
    day = (today or _dt.datetime.now(_dt.UTC).date()).isoformat()
    run = str(flower_run)
    with _locked(path):
        data = _read(path)
        used_day, used_run = int(data["days"].get(day, 0)), int(data["runs"].get(run, 0))
        if used_run >= per_run:
            raise Refusal(
                "budget-exhausted",
                f"coordinator run {run} already asked for {used_run} evaluation(s) "
                f"(federation.evaluation.max_queries_per_run = {per_run})",
            )
        if used_day >= per_day:
            raise Refusal(
                "budget-exhausted",
                f"{used_day} evaluation(s) already answered on {day} "
                f"(federation.evaluation.max_queries_per_day = {per_day})",
            )
        oldest = (_dt.date.fromisoformat(day) - _dt.timedelta(days=KEEP_DAYS)).isoformat()
        days = {d: n for d, n in data["days"].items() if d >= oldest}
        days[day] = used_day + 1
        runs = {r: n for r, n in data["runs"].items() if r != run}
        runs = dict(list(runs.items())[-(KEEP_RUNS - 1) :]) if KEEP_RUNS > 1 else {}
        runs[run] = used_run + 1
        write_json_atomic(path, {"days": days, "runs": runs})
    return {"run": used_run + 1, "day": used_day + 1}

"""The audit's rounds: run every registered test on the active tiles, drop the flagged ones, run again.

With ``audit.drop_flagged`` the flagged tiles of a round are dropped and the tests re-run on what remains, up to
``audit.max_rounds`` rounds. The verdict is that of the last round, on exactly the tiles that remain; tests that
judge the generator (``carried``, e.g. the memorisation rate) keep their first-round result in every round, so
dropping the tiles that made them fail cannot turn the verdict into a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pixcell_fed.audit.context import AuditContext
from pixcell_fed.audit.gate import FAIL, TestResult, verdict_of
from pixcell_fed.audit.registry import registered_tests
from pixcell_fed.runlog import get_logger

log = get_logger("audit")


@dataclass
class RoundsOutcome:
    """What the rounds decided: the final verdict and tests, the kept tiles and when each dropped tile went."""

    verdict: str
    tests: list[TestResult]
    active: np.ndarray
    rounds: list[dict[str, Any]] = field(default_factory=list)
    dropped_in: dict[int, int] = field(default_factory=dict)

    def test(self, name: str) -> TestResult:
        return next(t for t in self.tests if t.name == name)


def run_tests(ctx: AuditContext, active: np.ndarray, carried: dict[str, TestResult] | None = None) -> list[TestResult]:
    """Every registered test on the synthetic tiles ``active``, in report order; ``carried`` holds the first
    round's results of the carried tests (``None`` in the first round, which computes them)."""
    active = np.asarray(active, dtype=np.int64)
    return [carried[test.name] if carried is not None and test.carried else test.run(ctx, active)
            for test in registered_tests()]


def _carried(tests: list[TestResult]) -> dict[str, TestResult]:
    names = {t.name for t in registered_tests() if t.carried}
    return {t.name: t for t in tests if t.name in names}


def _record(number: int, audited: int, flagged: int, verdict: str, tests: list[TestResult]) -> dict[str, Any]:
    return {"round": number, "audited": audited, "flagged": flagged, "verdict": verdict,
            "tests": {t.name: t.status for t in tests}}


def run_rounds(ctx: AuditContext) -> RoundsOutcome:
    """Round 1 on all of S; then, while tiles are flagged and dropping is on, drop them and audit the rest."""
    cfg = ctx.cfg
    out = RoundsOutcome(FAIL, [], np.arange(len(ctx.roles.synthetic), dtype=np.int64))
    carried = None
    for number in range(1, cfg.max_rounds + 1):
        out.tests = run_tests(ctx, out.active, carried)
        carried = _carried(out.tests) if carried is None else carried
        out.verdict = verdict_of(out.tests)
        flagged = ctx.flagged(out.active)
        out.rounds.append(_record(number, len(out.active), len(flagged), out.verdict, out.tests))
        log.info("audit round %d: %d tiles, %d flagged, verdict %s", number, len(out.active), len(flagged), out.verdict)
        if not (cfg.drop_flagged and flagged and number < cfg.max_rounds):
            break
        out.dropped_in.update({i: number for i in flagged})
        out.active = np.array([i for i in out.active if i not in out.dropped_in], dtype=np.int64)
        out.rounds[-1]["dropped"] = len(flagged)
        if len(out.active) == 0:  # nothing left: nothing may be shipped
            out.tests, out.verdict = run_tests(ctx, out.active, carried), FAIL
            out.rounds.append(_record(number + 1, 0, 0, FAIL, out.tests))
            break
    return out

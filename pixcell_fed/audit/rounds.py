"""The audit's rounds: run every registered test on the active tiles, drop the flagged ones, run again.

With ``audit.drop_flagged`` the flagged tiles of a round are dropped and the tests re-run on what remains, up to
``audit.max_rounds`` rounds. Two verdicts come out, and the audit's verdict is the worse of them:

- the generator's, from the first round, on everything the generator made before anything was dropped: the
  dataset-level tests and the memorisation rate. Dropping tiles can never clear it: a set-level leak seen in round
  1 stays seen;
- the kept set's, from the last round, on exactly the tiles that remain (``kept``), which is what may ship.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pixcell_fed.audit.context import AuditContext
from pixcell_fed.audit.gate import FAIL, GENERATOR, SET, TestResult, decide, verdict_of, worst
from pixcell_fed.audit.registry import registered_tests
from pixcell_fed.runlog import get_logger

log = get_logger("audit")


@dataclass
class RoundsOutcome:
    """What the rounds decided: both verdicts and the final one, the final round's tests, the generator-level tests
    of round 1, the kept tiles and the round each dropped tile went in."""

    verdict: str
    tests: list[TestResult]
    active: np.ndarray
    rounds: list[dict[str, Any]] = field(default_factory=list)
    dropped_in: dict[int, int] = field(default_factory=dict)
    generator: list[TestResult] = field(default_factory=list)
    generator_verdict: str = FAIL
    kept_verdict: str = FAIL

    def test(self, name: str) -> TestResult:
        return next(t for t in self.tests if t.name == name)


def run_tests(ctx: AuditContext, active: np.ndarray, carried: dict[str, TestResult] | None = None) -> list[TestResult]:
    """Every registered test on the synthetic tiles ``active``, in report order (per-space tests once per privacy
    space), decided together; ``carried``: the first round's generator tests (None in the first round)."""
    active = np.asarray(active, dtype=np.int64)
    results: list[TestResult] = []
    for test in registered_tests():
        if test.level == GENERATOR and carried is not None:
            results.append(carried[test.name])
            continue
        for result in (
            [test.run(ctx.in_space(name), active) for name in ctx.spaces]
            if test.all_spaces
            else [test.run(ctx, active)]
        ):
            result.level = test.level  # the registry's word is the level
            results.append(result)
    return decide(results, ctx.cfg)


def _record(number: int, audited: int, flagged: int, verdict: str, tests: list[TestResult]) -> dict[str, Any]:
    return {
        "round": number,
        "audited": audited,
        "flagged": flagged,
        "verdict": verdict,
        "tests": {t.name: t.status for t in tests},
    }


def run_rounds(ctx: AuditContext) -> RoundsOutcome:
    """Round 1 on all of S; then, while tiles are flagged and dropping is on, drop them and audit the rest."""
    cfg = ctx.cfg
    out = RoundsOutcome(FAIL, [], np.arange(ctx.n_synthetic, dtype=np.int64))
    carried = None
    for number in range(1, cfg.max_rounds + 1):
        out.tests = run_tests(ctx, out.active, carried)
        if carried is None:
            out.generator = [t for t in out.tests if t.level in (SET, GENERATOR)]
            out.generator_verdict = verdict_of(out.generator)
            carried = {t.name: t for t in out.tests if t.level == GENERATOR}
        out.kept_verdict = verdict_of(out.tests)
        flagged = ctx.flagged(out.active)
        out.rounds.append(_record(number, len(out.active), len(flagged), out.kept_verdict, out.tests))
        log.info(
            "audit round %d: %d tiles, %d flagged, verdict %s", number, len(out.active), len(flagged), out.kept_verdict
        )
        if not (cfg.drop_flagged and flagged and number < cfg.max_rounds):
            break
        out.dropped_in.update(dict.fromkeys(flagged, number))
        out.active = np.array([i for i in out.active if i not in out.dropped_in], dtype=np.int64)
        out.rounds[-1]["dropped"] = len(flagged)
        if len(out.active) == 0:  # nothing left: nothing may be shipped
            out.tests, out.kept_verdict = run_tests(ctx, out.active, carried), FAIL
            out.rounds.append(_record(number + 1, 0, 0, FAIL, out.tests))
            break
    out.verdict = worst(out.generator_verdict, out.kept_verdict)
    return out

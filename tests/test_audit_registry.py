"""The audit is a registry of tests: one function per test, names unique, unknown names list the valid ones, and a
newly registered function runs in every round and reaches the report."""

from __future__ import annotations

import numpy as np
import pytest

from pixcell_fed.audit.context import build_context
from pixcell_fed.audit.gate import PASS, WARN, TestResult
from pixcell_fed.audit.registry import AUDIT_TESTS, audit_test, get_test, registered_tests
from pixcell_fed.audit.roles import build_roles
from pixcell_fed.audit.rounds import run_rounds
from pixcell_fed.config.schema import AuditConfig
from pixcell_fed.errors import RegistryError
from pixcell_fed.testing.audit_tiles import COPY_TRANSFORMS, stripe_tiles, write_tiles

BUILT_IN = ["memorisation", "copy_detection", "paired", "identifiers", "replication", "outliers", "dcr", "authenticity",
            "membership_inference", "fidelity"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    t_tiles = stripe_tiles(2, stride=128)[0]
    t = write_tiles(root / "T", t_tiles, "ref")
    h = write_tiles(root / "H", stripe_tiles(1, stride=128)[0], "hold")
    s = write_tiles(root / "S", stripe_tiles(0, stride=128)[0][:12], "new")
    s += write_tiles(root / "S", [COPY_TRANSFORMS["rot90"](t_tiles[4], np.random.default_rng(1))], "zz-copy")
    cfg = AuditConfig()
    return build_context(build_roles(s, t, h, source_of=None, min_holdout=cfg.min_holdout,
                                     min_holdout_ratio=cfg.min_holdout_ratio), cfg)


@pytest.fixture
def extra_test():
    """Register one more test for the duration of a test, then remove it again."""
    calls = []

    @audit_test("tiles_counted")
    def tiles_counted(ctx, active):
        calls.append(len(active))
        return TestResult("tiles_counted", "Tiles counted", WARN if len(active) > 12 else PASS,
                          {"audited": len(active)}, {}, f"{len(active)} tiles.")

    yield calls
    AUDIT_TESTS._items.pop("tiles_counted")


def test_the_built_in_tests_are_registered_in_report_order():
    assert [t.name for t in registered_tests()] == BUILT_IN
    assert get_test("dcr").run.__name__ == "dcr"


def test_a_duplicate_name_is_refused_and_an_unknown_one_lists_the_valid_names():
    registered_tests()
    with pytest.raises(RegistryError, match="duplicate audit test name 'dcr'"):
        audit_test("dcr")(lambda ctx, active: None)
    with pytest.raises(RegistryError) as info:
        get_test("no_such_test")
    assert "membership_inference" in info.value.hint and "copy_detection" in info.value.hint


def test_a_new_test_is_one_function_and_runs_in_every_round(ctx, extra_test):
    outcome = run_rounds(ctx)
    kept = 13 - outcome.rounds[0]["dropped"]
    assert extra_test == [13, kept] and kept <= 12 and 12 not in outcome.active  # the copy went in round 1
    assert [r["tests"]["tiles_counted"] for r in outcome.rounds] == ["WARN", "PASS"]
    assert outcome.test("tiles_counted").statistic == {"audited": kept}
    assert outcome.rounds[0]["verdict"] == "FAIL"
    assert [r["tests"]["memorisation"] for r in outcome.rounds] == ["FAIL", "FAIL"]  # carried, never recomputed


def test_the_context_is_built_once_and_holds_every_per_tile_result(ctx):
    assert len(ctx.s_tile.nn_sim) == 13 and len(ctx.h_tile.nn_sim) == len(ctx.roles.holdout)
    assert "copy" in ctx.reasons[-1] and not any("copy" in r for r in ctx.reasons[:-1])
    assert 12 in ctx.flagged(np.arange(13)) and ctx.paired is None
    assert list(ctx.spaces) == ["copy descriptor"] and ctx.family_size == 5

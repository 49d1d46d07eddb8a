"""The audit's tests, by name: each is one function ``(ctx, active) -> TestResult``.

``ctx`` is the :class:`~pixcell_fed.audit.context.AuditContext` built once per audit; ``active`` holds the indices
(into S) of the synthetic tiles a round audits. A new test is one new function decorated with
:func:`audit_test` in one of the test modules; the registry refuses duplicate names and lists the valid ones.
Tests are run and reported in the order they were registered.

A test's ``level`` says what it judges (:mod:`pixcell_fed.audit.gate`): ``tile`` tests judge single tiles, so
dropping flagged tiles repairs them; ``set`` tests judge the audited set with an exact p-value, corrected together
with the other set tests, and their first-round result on everything the generator made also stands as the
generator's verdict; a ``generator`` test runs once, in the first round, and its result is carried through every
round. So dropping tiles can never clear a finding about the generator. ``all_spaces`` runs a set test in every
privacy feature space (the copy descriptor, the conditioning encoder, extra encoders), once per space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pixcell_fed.registry import Registry

if TYPE_CHECKING:
    from pixcell_fed.audit.gate import TestResult

#: ``(ctx: AuditContext, active) -> TestResult``; the context is not imported here because it imports this registry
TestFn = Callable[[Any, np.ndarray], "TestResult"]
LEVELS = ("tile", "set", "generator")


@dataclass(frozen=True)
class AuditTest:
    """A registered test: its name, its place in the report, the function that runs it on one round, its level
    and whether it runs in every privacy feature space."""

    name: str
    order: int
    run: TestFn
    level: str = "tile"
    all_spaces: bool = False


AUDIT_TESTS: Registry[AuditTest] = Registry("audit test")

#: modules whose import registers the tests, in report order
_TEST_MODULES = ("pixcell_fed.audit.tests_per_tile", "pixcell_fed.audit.tests_dataset", "pixcell_fed.audit.fidelity")


def audit_test(name: str, *, level: str = "tile", all_spaces: bool = False) -> Callable[[TestFn], TestFn]:
    """Register the decorated function as the audit test ``name`` (``level``, ``all_spaces``: see above)."""
    if level not in LEVELS:
        raise ValueError(f"audit test level must be one of {LEVELS}, got {level!r}")

    def add(fn: TestFn) -> TestFn:
        AUDIT_TESTS.register(name, AuditTest(name, len(AUDIT_TESTS.names()), fn, level, all_spaces))
        return fn

    return add


def registered_tests() -> list[AuditTest]:
    """Every registered test in report order (imports the test modules on first use)."""
    import importlib

    for module in _TEST_MODULES:
        importlib.import_module(module)
    return sorted((AUDIT_TESTS.get(name) for name in AUDIT_TESTS), key=_report_position)


def _report_position(test: AuditTest) -> tuple[int, int]:
    """Report order: the test modules' order, then registration order within a module (whichever module a
    process happened to import first)."""
    module = getattr(test.run, "__module__", "")
    return (_TEST_MODULES.index(module) if module in _TEST_MODULES else len(_TEST_MODULES), test.order)


def get_test(name: str) -> AuditTest:
    """The registered test ``name``; an unknown name raises RegistryError listing the valid ones."""
    registered_tests()
    return AUDIT_TESTS.get(name)

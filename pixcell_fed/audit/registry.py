"""The audit's tests, by name: each is one function ``(ctx, active) -> TestResult``.

``ctx`` is the :class:`~pixcell_fed.audit.context.AuditContext` built once per audit; ``active`` holds the indices
(into S) of the synthetic tiles a round audits. A new test is one new function decorated with
:func:`audit_test` in one of the test modules; the registry refuses duplicate names and lists the valid ones.
Tests are run and reported in the order they were registered. A test registered with ``carried=True`` judges the
generator rather than the tiles that remain: it runs once, in the first round on all of S before anything is
dropped, and its result is carried through every later round, so dropping tiles can never clear it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from pixcell_fed.registry import Registry

if TYPE_CHECKING:
    from pixcell_fed.audit.context import AuditContext
    from pixcell_fed.audit.gate import TestResult

TestFn = Callable[["AuditContext", np.ndarray], "TestResult"]


@dataclass(frozen=True)
class AuditTest:
    """A registered test: its name, its place in the report, the function that runs it on one round, and whether
    its first-round result is carried through every round."""

    name: str
    order: int
    run: TestFn
    carried: bool = False


AUDIT_TESTS: Registry[AuditTest] = Registry("audit test")

#: modules whose import registers the tests, in report order
_TEST_MODULES = ("pixcell_fed.audit.tests_per_tile", "pixcell_fed.audit.tests_dataset")


def audit_test(name: str, *, carried: bool = False) -> Callable[[TestFn], TestFn]:
    """Register the decorated function as the audit test ``name`` (``carried``: see the module docstring)."""

    def add(fn: TestFn) -> TestFn:
        AUDIT_TESTS.register(name, AuditTest(name, len(AUDIT_TESTS.names()), fn, carried))
        return fn

    return add


def registered_tests() -> list[AuditTest]:
    """Every registered test in report order (imports the test modules on first use)."""
    import importlib

    for module in _TEST_MODULES:
        importlib.import_module(module)
    return sorted((AUDIT_TESTS.get(name) for name in AUDIT_TESTS), key=lambda t: t.order)


def get_test(name: str) -> AuditTest:
    """The registered test ``name``; an unknown name raises RegistryError listing the valid ones."""
    registered_tests()
    return AUDIT_TESTS.get(name)

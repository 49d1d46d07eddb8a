"""The typed error hierarchy of pixcell-fed and the exit codes the CLIs map it to.

Every error a user can cause or fix derives from :class:`PixcellFedError` and carries a ``hint`` (what to do) and
an ``exit_code``. The CLIs have one error boundary each that prints ``error: <message>`` and ``hint: <hint>`` on
stderr and exits with that code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of ``site-agent`` and ``coordinator``."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    PRIVACY_REFUSED = 3
    PARTIAL = 4


class PixcellFedError(Exception):
    """Base class: a known failure with a message, a hint and an exit code."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(PixcellFedError):
    """Bad command-line arguments or a missing/empty input folder."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A configuration file is invalid: unknown key, wrong type, missing value."""


class SlideError(PixcellFedError):
    """One slide cannot be used (unreadable, no resolution, no tissue...). Batch jobs record it and go on."""


class MppUnavailableError(SlideError):
    """The slide carries no resolution and the config has no override for it."""


class NoTissueError(SlideError):
    """Tissue detection found nothing to tile."""


class WeightsError(PixcellFedError):
    """A model or encoder folder is missing, incomplete or does not match the expected architecture."""

    exit_code = ExitCode.USAGE


class RegistryError(UsageError):
    """An unknown or duplicate name in one of the registries."""


class AuditError(PixcellFedError):
    """The audit could not run (bad inputs, roles violated)."""


class PrivacyGateRefused(PixcellFedError):
    """The audit verdict is FAIL or the officer refused: nothing may leave the site."""

    exit_code = ExitCode.PRIVACY_REFUSED


class BundleError(PixcellFedError):
    """A bundle is malformed or cannot be built."""


class VerificationError(BundleError):
    """A bundle failed verification (signature, hashes, approval, trust)."""

    exit_code = ExitCode.PRIVACY_REFUSED


class TrailError(PixcellFedError):
    """The site audit trail is broken: an entry was edited, deleted, reordered or half-written."""


class KeyFileError(PixcellFedError):
    """A key file is missing, unreadable, has unsafe permissions or a wrong passphrase."""

    exit_code = ExitCode.USAGE


class LockedError(PixcellFedError):
    """Another run holds the lock on this site folder."""

    exit_code = ExitCode.USAGE


class FederationError(PixcellFedError):
    """The Flower deployment or a pooling exchange failed."""


class DistributedError(PixcellFedError):
    """A rank of a sharded run (torchrun) failed, lost contact with the others or waited past its timeout."""


class PartialSuccess(PixcellFedError):
    """The job finished, but some items failed; their reasons are in the summary."""

    exit_code = ExitCode.PARTIAL


class DPRefused(PrivacyGateRefused):
    """A DP-SGD round was refused before training: model not DP-correct, request outside the site's policy,
    settings with no finite privacy guarantee, or the site's privacy budget would be exceeded."""


class PrivacyLedgerError(DPRefused):
    """The site's privacy ledger is missing, damaged or out of step with the audit trail: no DP training until a
    privacy officer resets it (``site-agent privacy-ledger-reset``)."""

"""The consortium's Flower app as shipped in the installed package, and the pin a site computes from it.

``pixcell_fed/flower_app/`` is the whole app a run sends to the sites: a ``pyproject.toml`` with
``[tool.flwr.app]`` and two one-line shims (``pixcell_fed_app/server_app.py`` imports the installed
``coordinator.server_app``; ``client_app.py`` the installed ``site_agent.client_app``). So the app bundle (FAB)
is a few kilobytes of reviewable text, and Flower builds it deterministically (fixed zip dates, sorted paths): the
coordinator's ``flwr run`` and a site's ``site-agent app-hash`` get the same SHA-256 from the same release. A site
pins that hash (``federation.app_sha256``) and its launcher refuses every other app.

The build is flwr's own (``flwr.cli.build.build_fab_from_disk``, a flwr 1.42 internal), so the hash changes when
the app folder or the FAB format changes: upgrade pixcell-fed and flwr together at the coordinator and the sites.
"""

from __future__ import annotations

from pathlib import Path

from pixcell_fed.errors import ConfigError, UsageError
from pixcell_fed.hashing import is_sha256_hex, sha256_bytes

APP_FOLDER = "flower_app"


def check_sha256(value: object, what: str = "app hash") -> str:
    """``value`` if it is a lowercase hex SHA-256, else :class:`ConfigError`."""
    if not is_sha256_hex(value):
        raise ConfigError(
            f"{what} {value!r} is not a SHA-256 (64 lowercase hex digits)",
            hint="copy the value printed by 'site-agent app-hash'",
        )
    return value


def app_dir() -> Path:
    """The Flower app folder of this installation."""
    import pixcell_fed

    folder = Path(pixcell_fed.__file__).resolve().parent / APP_FOLDER
    if not (folder / "pyproject.toml").is_file():
        raise UsageError(
            f"the Flower app folder {folder} is missing its pyproject.toml",
            hint="reinstall pixcell-fed (the folder is part of the package)",
        )
    return folder


def build_app_fab(app: Path | None = None) -> bytes:
    """The app bundle exactly as ``flwr run`` builds it from ``app`` (default: this installation's app)."""
    import warnings

    from flwr.cli.build import build_fab_from_disk

    with warnings.catch_warnings():  # flwr 1.42's .gitignore matching uses a pathspec API that warns on every file
        warnings.simplefilter("ignore", DeprecationWarning)
        return build_fab_from_disk(Path(app) if app is not None else app_dir())


def app_sha256(app: Path | None = None) -> str:
    """The SHA-256 a SuperNode sees as the run's ``fab_hash``: the value to pin in ``federation.app_sha256``."""
    return sha256_bytes(build_app_fab(app))

"""Create a site folder: ``site.yaml`` from the documented example, the site's signing key pair, officer notes."""

from __future__ import annotations

import re
from pathlib import Path

from pixcell_fed.errors import ConfigError, UsageError

OFFICER_MD = """# Privacy officer: your approval key

Bundles of synthetic tiles from site **{name}** leave the hospital only after you, the privacy officer, have
read the audit report and approved them with a key of your own. The site's signing key (in `keys/`) is the
administrator's; it cannot approve.

1. On a machine you control, make your key pair (choose a passphrase and keep it to yourself):

       export OFFICER_PASSPHRASE='...'
       site-agent officer-key --out ~/officer-key --passphrase-env OFFICER_PASSPHRASE

   This writes `officer.key` (private, mode 0600: never share it, never copy it into the site folder) and
   `officer.pub`, and prints the public key as one line `ed25519:...`.
2. Give that public key line to the site administrator, who adds it to this site's `site.yaml`:

       keys:
         officers:
           - ed25519:...

   Only the keys listed there can approve or reject this site's bundles. Send the same line to the consortium,
   who lists it under `sites: {name}: officers:` in the trust file. The site's own public key, for
   `signing_key:`, is `keys/site_signing.pub` in this folder:

       {public_key}

3. When a run ends, `site-agent status --config site.yaml` lists the bundles awaiting approval. Review:

       site-agent approve work/runs/<run>/bundle --config site.yaml --key ~/officer-key/officer.key --passphrase-env OFFICER_PASSPHRASE

   checks that the bundle is intact and exactly what its run audited, shows the verdict and where the reports
   are, asks for confirmation and signs. To refuse:

       site-agent reject work/runs/<run>/bundle --config site.yaml --key ~/officer-key/officer.key --reason "what is wrong"

   Both are recorded in the site's audit trail (`work/audit_trail.jsonl`) with your key's fingerprint. See
   docs/privacy-officer-approval.md.
"""


def example_config_path() -> Path:
    """The documented example config, ``configs/site.example.yaml``, which the package carries (``pixcell_fed/configs``
    is a link to ``configs/``, so an installed wheel holds a copy and an editable install reads the folder)."""
    from importlib import resources

    path = Path(str(resources.files("pixcell_fed") / "configs" / "site.example.yaml"))
    if not path.is_file():
        raise ConfigError(
            f"the example config is missing: {path}", hint="reinstall pixcell-fed from its release folder"
        )
    return path


def site_yaml_text(name: str, passphrase_env: str | None) -> str:
    """The example config with ``site.name`` (and ``keys.passphrase_env``) set."""
    text = example_config_path().read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^(  name: )site(\s)", lambda m: f"{m.group(1)}{name}{m.group(2)}", text, count=1)
    if n != 1:
        raise ConfigError("cannot find 'site.name' in the example config", hint="report this as a bug in pixcell-fed")
    if passphrase_env:
        text, n = re.subn(
            r"(?m)^(  passphrase_env: )null(\s)", lambda m: f"{m.group(1)}{passphrase_env}{m.group(2)}", text, count=1
        )
        if n != 1:
            raise ConfigError("cannot find 'keys.passphrase_env' in the example config", hint="report this as a bug")
    return text


def init_site(folder: str | Path, *, name: str | None = None, passphrase_env: str | None = None) -> dict:
    """Create the site folder; return what was written (paths, public key text, fingerprint)."""
    from pixcell_fed.atomic import write_text_atomic
    from pixcell_fed.bundle.layout import SITE_NAME_RE
    from pixcell_fed.config import load_site_config
    from pixcell_fed.keys import fingerprint, passphrase_from_env, public_key_text, write_key_pair

    folder = Path(folder)
    name = name or folder.resolve().name
    if not SITE_NAME_RE.match(name):
        raise UsageError(f"invalid site name {name!r}", hint="use letters, digits, '-' or '_' (pass --name)")
    if passphrase_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", passphrase_env):
        raise UsageError(
            f"invalid environment variable name {passphrase_env!r}", hint="e.g. --passphrase-env SITE_KEY_PASSPHRASE"
        )
    passphrase = passphrase_from_env(passphrase_env)
    config_path = folder / "site.yaml"
    if config_path.exists():
        raise UsageError(f"{config_path} already exists", hint="this folder is already a site; choose another folder")
    text = site_yaml_text(name, passphrase_env)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path, public_key = write_key_pair(folder / "keys" / "site_signing.key", passphrase=passphrase)
    write_text_atomic(config_path, text)
    cfg = load_site_config(config_path)  # the written config must load
    for sub in (cfg.site.slides_dir, cfg.site.work_dir):
        sub.mkdir(parents=True, exist_ok=True)
    officer = write_text_atomic(
        folder / "OFFICER.md", OFFICER_MD.format(name=name, public_key=public_key_text(public_key))
    )
    return {
        "dir": str(folder),
        "name": name,
        "config": str(config_path),
        "private_key": str(private_path),
        "public_key": str(public_path),
        "public_key_text": public_key_text(public_key),
        "fingerprint": fingerprint(public_key),
        "encrypted": passphrase is not None,
        "officer_instructions": str(officer),
    }

"""Role grants: which roles an OS user may act as, signed by a key administrator.

Without grants a role is whatever ``--role`` says. With them (``ehrlake grants init`` creates the
administrator's Ed25519 key pair; ``ehrlake grants add --user U --role R`` signs a grant), the user
running a job is resolved from the operating system at start, and a role is accepted only if a
grant for that user names it and its signature verifies with the administrator's public key:
``--role`` may only choose among the granted roles. The private key stays with the administrator
(``security.grant_admin_key``); the grants directory (``security.grants``, outside the lake) holds
the public key and one signed file per user. A lake remembers the administrator's key fingerprint
on its first job after grants exist (``identity.py``), so removing or swapping the public key later
does not switch enforcement off.

Trusted, as for the access policy itself: the configuration naming these paths, the library code,
and the OS account boundary. Someone who runs their own code with the master key is not stopped by
roles at all (docs/security.md); grants stop a user from simply claiming a role.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from ehrlake.errors import AccessDenied, EhrlakeError
from ehrlake.security.keys import replace_whole

PUBLIC_FILE = "admin.pub"


def current_user() -> str:
    """The OS user running this process, from its uid (``$USER``/``$LOGNAME`` can be set by anyone)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (some containers)
        return str(os.getuid())


def _payload(user: str, roles: list[str], issued_at: str) -> bytes:
    return json.dumps({"user": user, "roles": sorted(roles), "issued_at": issued_at}, sort_keys=True).encode()


@dataclass(frozen=True)
class Grants:
    """The grants directory of a deployment."""

    directory: Path

    @property
    def public_file(self) -> Path:
        return self.directory / PUBLIC_FILE

    def fingerprint(self) -> str | None:
        """A short hash of the administrator's public key; None when grants are not set up."""
        if not self.public_file.is_file():
            return None
        return hashlib.sha256(self.public_file.read_bytes().strip()).hexdigest()[:16]

    def grant_file(self, user: str) -> Path:
        return self.directory / f"{user}.grant.json"

    def roles_of(self, user: str) -> tuple[str, ...]:
        """The roles ``user`` holds by a grant whose signature verifies (none without a grant)."""
        path = self.grant_file(user)
        if not path.is_file():
            return ()
        grant = json.loads(path.read_text())
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(self.public_file.read_text().strip()))
        try:
            public.verify(
                base64.b64decode(grant["signature"]),
                _payload(grant["user"], grant["roles"], grant["issued_at"]),
            )
        except (InvalidSignature, KeyError, ValueError):
            raise AccessDenied(
                f"the grant for user {user} ({path}) is not signed by the grant administrator"
            ) from None
        if grant["user"] != user:
            raise AccessDenied(f"the grant in {path} is for user {grant['user']}, not {user}")
        return tuple(sorted(grant["roles"]))

    # --------------------------------------------------------------- administrator side
    def init(self, admin_key_file: str) -> None:
        """Create the administrator's key pair: private key 0600 at ``admin_key_file``, public key here."""
        if os.path.exists(admin_key_file) or self.public_file.exists():
            raise EhrlakeError(
                f"grants are set up already ({admin_key_file}, {self.public_file}); not replacing them"
            )
        private = Ed25519PrivateKey.generate()
        Path(admin_key_file).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(admin_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
        self.directory.mkdir(parents=True, exist_ok=True)
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_file.write_text(base64.b64encode(public).decode() + "\n")

    def issue(self, admin_key_file: str, user: str, roles: list[str]) -> Path:
        """Sign and store ``user``'s grant (replacing an earlier one); needs the private key."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        if not os.path.isfile(admin_key_file):
            raise EhrlakeError(f"grant administrator key {admin_key_file} not found (ehrlake grants init)")
        private = load_pem_private_key(Path(admin_key_file).read_bytes(), password=None)
        issued_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        signature = base64.b64encode(private.sign(_payload(user, roles, issued_at))).decode()
        grant = {"user": user, "roles": sorted(set(roles)), "issued_at": issued_at, "signature": signature}
        path = self.grant_file(user)
        replace_whole(path, json.dumps(grant, indent=2))
        return path

    def show(self) -> dict[str, list[str]]:
        return {
            p.name.removesuffix(".grant.json"): json.loads(p.read_text())["roles"]
            for p in sorted(self.directory.glob("*.grant.json"))
        }

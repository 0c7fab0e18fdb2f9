"""A private Dovecot whose XOAUTH2/OAUTHBEARER logins are checked by an ``oauth2``
passdb against a local introspection endpoint (see ``research/dovecot-oauth2.md``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mailpipe.testing.dovecot import DEFAULT_MECHANISMS, Dovecot

__all__ = ["OAuthDovecot"]


class OAuthDovecot(Dovecot):
    """:class:`~mailpipe.testing.dovecot.Dovecot` with an ``oauth2`` passdb first.

    ``introspection_url`` is an RFC 7662 endpoint (``https://127.0.0.1:PORT/...``)
    whose certificate is verified against ``introspection_ca`` (copied into the
    base directory so Dovecot's auth process can read it). The token's ``username``
    field must equal the login user. Dovecot's auth cache stays off, so a revoked
    token is refused at the next login. Password logins keep working (PLAIN etc.).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        introspection_url: str,
        introspection_ca: Path,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault(
            "auth_mechanisms", (*DEFAULT_MECHANISMS, "xoauth2", "oauthbearer")
        )
        super().__init__(base_dir, **kwargs)
        self.introspection_url = introspection_url
        self.introspection_ca = Path(introspection_ca)

    @property
    def oauth2_conf(self) -> Path:
        """The passdb's ``dovecot-oauth2.conf.ext``."""
        return self.base_dir / "dovecot-oauth2.conf.ext"

    def _config(self) -> str:
        ca = self.base_dir / "ssl" / "introspection-ca.pem"
        shutil.copyfile(self.introspection_ca, ca)
        ca.chmod(0o644)
        self.oauth2_conf.write_text(
            "\n".join(
                [
                    f"introspection_url = {self.introspection_url}",
                    "introspection_mode = post",
                    "username_attribute = username",
                    "active_attribute = active",
                    "active_value = true",
                    "timeout_msecs = 10000",
                    f"tls_ca_cert_file = {ca}",
                    "",
                ]
            )
        )
        self.oauth2_conf.chmod(0o644)
        passdb = "\n".join(
            [
                "passdb {",
                "  driver = oauth2",
                "  mechanisms = xoauth2 oauthbearer",
                f"  args = {self.oauth2_conf}",
                "}",
                "auth_cache_size = 0",
                "",
            ]
        )
        return super()._config().replace("passdb {", passdb + "passdb {", 1)

"""Google flows through ``google-auth``: a service account with domain-wide delegation
acting as one Workspace user (``subject``), or an installed-app refresh token."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Final

from mailpipe.errors import MailpipeError
from mailpipe.oauth.grant import (
    BUSY_CODES,
    Grant,
    error_from,
    parse_retry_after,
    transport_errors,
    trust,
)
from mailpipe.oauth.options import GoogleOAuth
from mailpipe.oauth.scopes import Protocol


class GoogleFlow:
    """:class:`~mailpipe.oauth.grant.Flow` for ``provider = "google"``."""

    def __init__(
        self, options: GoogleOAuth, protocol: Protocol, *, username: str
    ) -> None:
        self.options = options
        self.scopes = list(options.effective_scopes(protocol))
        self.subject = options.subject or username
        self.needs_refresh_token = options.flow == "refresh_token"
        self.where = f"google {options.token_uri}"

    def _request(self) -> Any:
        import google.auth.transport.requests
        import requests

        session = trust(requests.Session(), self.options.ca_file)
        return _OneRequest(
            google.auth.transport.requests.Request(session),
            timeout=self.options.timeout,
            where=self.where,
        )

    def _credentials(self, refresh_token: str) -> Any:
        o = self.options
        if o.flow == "service_account":
            from google.oauth2 import service_account

            assert o.service_account_file is not None
            try:
                info = json.loads(o.service_account_file.read_text())
                info["token_uri"] = o.token_uri
                return service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                    info, scopes=self.scopes, subject=self.subject
                )
            except (OSError, ValueError, KeyError) as exc:
                raise MailpipeError(
                    f"service_account_file {o.service_account_file}: not a service "
                    f"account key ({type(exc).__name__})"
                ) from None
        from google.oauth2.credentials import Credentials

        assert o.client_secret is not None
        return Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=refresh_token,
            token_uri=o.token_uri,
            client_id=o.client_id,
            client_secret=o.client_secret.get(),
            scopes=self.scopes,
        )

    def acquire(self, refresh_token: str) -> Grant:
        """Refresh the credentials once; the lifetime comes from their expiry."""
        import google.auth.exceptions

        creds = self._credentials(refresh_token)
        try:
            with transport_errors(self.where):
                creds.refresh(self._request())
        except google.auth.exceptions.RefreshError as exc:
            data = exc.args[1] if len(exc.args) > 1 else {}
            data = data if isinstance(data, dict) else {}
            raise error_from(
                str(data.get("error", "refresh_failed")),
                str(data.get("error_description", "")),
                where=self.where,
            ) from None
        except google.auth.exceptions.TransportError as exc:
            raise error_from(
                "temporarily_unavailable", type(exc).__name__, where=self.where
            ) from None
        expiry = creds.expiry  # naive UTC
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        lifetime = (expiry - now).total_seconds() if expiry else 3600.0
        return Grant(
            access_token=str(creds.token),
            expires_in=max(0.0, lifetime),
            refresh_token=str(getattr(creds, "refresh_token", "") or ""),
        )


class _OneRequest:
    """google-auth's transport with ``timeout`` applied to every request and no
    internal retry: google-auth retries a 429/5xx itself (with its own back-off, and
    ignoring Retry-After), which outlives the broker's refresh lease, so the first
    such answer becomes TokenEndpointBusy (with the answer's Retry-After) here and
    the broker decides when to ask again."""

    # google-auth retries these statuses and error codes (google.oauth2._client).
    _RETRIED: Final = frozenset({408, 429, 500, 502, 503, 504})

    def __init__(self, request: Any, *, timeout: float, where: str) -> None:
        self._request = request
        self._timeout = timeout
        self._where = where

    def __call__(self, url: str, method: str = "GET", **kwargs: Any) -> Any:
        kwargs["timeout"] = self._timeout
        response = self._request(url, method=method, **kwargs)
        if response.status == 200:
            return response
        try:
            data = json.loads(response.data)
        except (TypeError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        code = str(data.get("error") or "")
        busy = BUSY_CODES | {"internal_failure"}
        if response.status in self._RETRIED or code in busy:
            headers = getattr(response, "headers", {}) or {}
            raise error_from(
                code if code in BUSY_CODES else "temporarily_unavailable",
                "",
                where=self._where,
                retry_after=parse_retry_after(headers.get("Retry-After")),
            )
        return response

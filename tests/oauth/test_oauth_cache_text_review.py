"""Review of h-lows item 3: the token cache lives in the journal's database and keeps
the token endpoint's error text (its JSON ``error_description``, which may carry
``\\u0000`` or a lone surrogate escape); it is stored as the ledger's texts are."""

from pathlib import Path

from mailpipe.oauth.cache import TokenCache
from mailpipe.oauth.sealing import Sealer

from .conftest import Clock


def test_an_endpoint_error_text_is_recorded_storable(
    cache_key: str, clock: Clock, tmp_path: Path
) -> None:
    cache = TokenCache(str(tmp_path / "j.sqlite3"), base_dir=tmp_path,
                       sealer=Sealer(cache_key), clock=clock)
    try:
        cache.store("acct", access_token="", refresh_token="rt", expires_at=0.0,
                    refresh_at=0.0, rt_issued_at=None)
        assert cache.record_error("acct", code="invalid_grant",
                                  message="refused: a\x00b \ud800", rt_issued_at=None)
        entry = cache.load("acct")
        assert entry is not None
        assert entry.last_error == "refused: a\\x00b \\ud800"
        assert entry.last_error_code == "invalid_grant"
    finally:
        cache.close()

"""plugins/parse/base64_decode: binascii's result (or its error) for every input, the
vectorised decoder only where every decoder agrees (issue 18)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import random
from pathlib import Path

import pytest
from mailpipe.plugins.parse import base64_decode
from mailpipe.plugins.parse.base64_decode import NOT_ALPHABET, a2b_base64, decode_clean


def _binascii(data: bytes) -> bytes | str:
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        return "error"


def _ours(data: bytes) -> bytes | str:
    try:
        return a2b_base64(data)
    except binascii.Error:
        return "error"


QUIRKS = [
    b"", b"QQ==", b"QR==", b"QUI=", b"QUJ=", b"QUJD", b"QQ==QUJD", b"Q", b"QQ", b"QQ=",
    b"====", b"Q===", b"QU=D", b"QUJD=", b"QUJD==", b"QUJD====", b"=QUJD", b"QUJD\r\nQUJD",
    b"QQ==\r\n", b"QU JD", b"QUJD\x00\xff", b"-_-_", b"QUJ\r\n=", b"QR=\r\n=",
]


@pytest.mark.parametrize("data", QUIRKS)
def test_quirks_decode_as_binascii_does(data: bytes) -> None:
    assert _ours(data) == _binascii(data)


def _mutated(rng: random.Random) -> bytes:
    raw = rng.randbytes(rng.randrange(0, 200))
    text = bytearray(base64.encodebytes(raw).replace(b"\n", b"\r\n"))
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        pos = rng.randrange(len(text) + 1)
        what = rng.choice([b"=", b"==", b"\r\n", b" ", b"-", b"\x00", b"A", b"Q", b"\xe9"])
        if rng.random() < 0.5 and text:
            del text[pos : pos + rng.randrange(1, 4)]
        text[pos:pos] = what
    return bytes(text)


def test_mutated_base64_decodes_as_binascii_does() -> None:
    rng = random.Random(20261205)
    fast = 0
    for _ in range(20_000):
        data = _mutated(rng)
        assert _ours(data) == _binascii(data), data
        clean = data.translate(None, NOT_ALPHABET)
        fast += len(clean) % 4 == 0 and b"=" not in clean.rstrip(b"=")
    assert fast > 5_000  # the fast path was taken, not only binascii's


def test_clean_input_takes_the_vectorised_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = base64_decode._simd_b64decode

    def counting(data: bytes, validate: bool = False) -> bytes:
        calls.append(len(data))
        return real(data, validate=validate)

    monkeypatch.setattr(base64_decode, "_simd_b64decode", counting)
    raw = os.urandom(3 << 20)
    assert a2b_base64(base64.encodebytes(raw)) == raw
    assert decode_clean(base64.b64encode(raw)) == raw
    assert len(calls) == 2
    assert a2b_base64(b"QQ==QUJD") == b"A"  # padding inside: binascii decides
    assert len(calls) == 2


def _with_attachment(payload: bytes) -> bytes:
    part = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.org\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + part + b"--b--\r\n"
    )


@pytest.mark.parametrize("size", [30_000, 3_000_000], ids=["in-memory", "elided-run"])
def test_parse_decodes_attachments_with_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: int
) -> None:
    """Both of parse's base64 paths go through it: a leaf decoded in memory
    (walk._b64decode) and a long run read back from the raw bytes (spool.RunDecoder)."""
    from mailpipe.plugins.parse.parser import parse_file

    decoded: list[int] = []
    real = base64_decode._simd_b64decode

    def counting(data: bytes, validate: bool = False) -> bytes:
        out = real(data, validate=validate)
        decoded.append(len(out))
        return out

    monkeypatch.setattr(base64_decode, "_simd_b64decode", counting)
    payload = random.Random(size).randbytes(size)
    path = tmp_path / "m.eml"
    path.write_bytes(_with_attachment(payload))
    with path.open("rb") as f:
        record, _ = parse_file(f, spool_dir=tmp_path)
    (attachment,) = record.attachments
    assert attachment.sha256 == hashlib.sha256(payload).hexdigest()
    assert sum(decoded) >= size - 3  # (RunDecoder's last quantum goes to binascii)


def test_unused_bits_set_take_the_vectorised_decoder_with_binasciis_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A last quantum whose unused bits are set (``QR==``, ``QUJ=``) is not refused by
    pybase64 (``canonical`` off): it drops the bits as binascii does (review r-b64:
    the module said pybase64 refuses them and binascii decides)."""
    calls: list[bytes] = []
    real = base64_decode._simd_b64decode

    def counting(data: bytes, validate: bool = False) -> bytes:
        calls.append(data)
        return real(data, validate=validate)

    monkeypatch.setattr(base64_decode, "_simd_b64decode", counting)
    alphabet = base64_decode.ALPHABET[:-1]
    for last in alphabet:
        for data in (b"QUJD" + bytes([last]) + b"Q==", b"QUJD" + b"QU" + bytes([last]) + b"="):
            assert decode_clean(data) == binascii.a2b_base64(data), data
    assert len(calls) == 2 * 64  # none went to binascii


def test_every_simd_path_decodes_as_binascii_does() -> None:
    """Each of pybase64's code paths this CPU has (SSSE3 … AVX512, or NEON; and the
    scalar one) on lengths around their block sizes, ends with 0-3 ``=`` and unused
    bits set (review r-b64; the fuzz test above runs the fastest path only)."""
    simd = pytest.importorskip("pybase64._pybase64")
    private = ("_get_simd_flags_runtime", "_get_simd_path", "_set_simd_path",
               "_get_simd_name")
    if not all(hasattr(simd, name) for name in private):
        pytest.skip("this pybase64 has no (private) switch between its code paths")
    rng = random.Random(64)
    alphabet = base64_decode.ALPHABET[:-1]
    lengths = [n for block in (16, 24, 32, 48, 64, 96, 128, 256) for k in (1, 2, 3)
               for n in range(block * k - 5, block * k + 6) if n >= 0]
    inputs = [
        bytes(rng.choice(alphabet) for _ in range(n)) + end
        for n in lengths for end in (b"", b"=", b"==", b"===")
    ]
    runtime = simd._get_simd_flags_runtime()
    before = simd._get_simd_path()
    paths = [0] + [1 << bit for bit in range(16) if runtime & (1 << bit)]
    try:
        for flags in paths:
            simd._set_simd_path(flags)
            assert simd._get_simd_path() == flags  # the switch took effect
            name = simd._get_simd_name(simd._get_simd_path())
            for data in inputs:
                assert _ours(data) == _binascii(data), (name, data)
    finally:
        simd._set_simd_path(before)

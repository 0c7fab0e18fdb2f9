"""Loopback TCP proxy adding a fixed one-way delay to every chunk in each direction.

``python bench/proxy.py --target 127.0.0.1:PORT --delay-ms 10`` listens on a free
127.0.0.1 port, prints ``listening <port>`` on stdout, then serves until SIGTERM. Every
chunk read from either side is forwarded ``delay-ms`` after it was read; reading goes on
while chunks wait, so pipelined traffic keeps its pipelining (a link with propagation
delay, not a slow link). Used by ``bench/run --latency-ms``: the kernel here has no
netem, so ``tc qdisc ... netem delay`` is not available.

``--log FILE`` appends one line per chunk read (monotonic time, direction ``>`` client
to server or ``<`` back, octets, the first octets): counting the turnarounds (a ``>``
chunk after a ``<`` one) shows how many round trips a client paid.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

_LOG = None


def _note(direction: str, data: bytes) -> None:
    if _LOG is not None:
        _LOG.write(f"{time.monotonic():.6f} {direction} {len(data)} {data[:60]!r}\n")


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
    direction: str = ">",
) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.create_task(forward())
    try:
        while True:
            data = await reader.read(1 << 18)
            _note(direction, data)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        task.cancel()
    finally:
        if not task.done():
            await asyncio.wait([task], timeout=delay + 5)


async def _serve(target_host: str, target_port: int, delay: float, listen: int) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(target_host, target_port)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(_pump(cr, sw, delay), _pump(sr, cw, delay, "<"))
        except asyncio.CancelledError:
            pass  # the proxy is stopping (SIGTERM): connections close quietly
        finally:
            for w in (sw, cw):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    ap.add_argument("--listen", type=int, default=0, help="port (0: a free one)")
    ap.add_argument("--log", help="append one line per chunk to this file")
    a = ap.parse_args()
    global _LOG
    if a.log:
        _LOG = open(a.log, "a", buffering=1)  # noqa: SIM115 (open for the process)
    host, _, port = a.target.rpartition(":")
    asyncio.run(_serve(host, int(port), a.delay_ms / 1000.0, a.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The metrics endpoint (appliance/metrics.py) against a scraper that never reads its answer."""

from __future__ import annotations

import asyncio
import socket

from appliance import metrics


def test_a_scraper_that_never_reads_is_cut_after_the_grace(monkeypatch):
    """The answer does not fit in the (small) socket buffers and the scraper reads none of it:
    the endpoint's polite close would wait for it for good; it is cut after CLOSE_GRACE."""
    monkeypatch.setattr(metrics, "CLOSE_GRACE", 0.2)
    for i in range(300):  # a body of some 30 KB
        metrics.child(metrics.CLAMD_SCANS, f"/run/clamd-test-{i}.ctl", "clean").inc()

    async def main() -> bytes:
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        theirs.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reader, writer = await asyncio.open_connection(sock=ours)
        await metrics._handle(reader, writer)
        await asyncio.sleep(0.5)  # past the grace, reading nothing
        theirs.settimeout(2)
        received = b""
        while chunk := theirs.recv(65536):  # what was buffered, then the end
            received += chunk
        theirs.close()
        return received

    try:
        assert asyncio.run(main()).startswith(b"HTTP/1.0 200 OK")
    finally:
        for i in range(300):
            metrics.CLAMD_SCANS.remove(f"/run/clamd-test-{i}.ctl", "clean")
            metrics._children.pop((metrics.CLAMD_SCANS, (f"/run/clamd-test-{i}.ctl", "clean")),
                                  None)

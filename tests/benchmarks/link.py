"""A slow network link for benchmarks: a TCP relay in its own process that
holds every byte from the server to the client ``delay`` seconds (the added
round trip), the way a database one network hop away answers.

    python -m tests.benchmarks.link <unix socket path or host:port> <delay seconds>

prints the port it listens on (127.0.0.1) and relays until terminated.

Kernel delay (``tc netem`` in a network namespace) would cost no CPU here, but
it needs the ``sch_netem`` module, which containers often lack. An event loop
cannot hold bytes for half a millisecond: libuv's and epoll's timers count
whole milliseconds (a 0.5 ms delay became ~2 ms a query). So each direction of
each connection is a thread, and the delayed one sleeps with ``time.sleep``
(nanosecond clock, ~50 µs of timer slack). What the relay itself costs shows in
``run.py``'s "relay without delay" row.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import sys
import threading
import time


def _connect(target: str) -> socket.socket:
    if target.startswith("/"):
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(target)
        return upstream
    host, port = target.rsplit(":", 1)
    upstream = socket.create_connection((host, int(port)))
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return upstream


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


def _pump_late(source: socket.socket, sink: socket.socket, delay: float) -> None:
    """Forward each chunk ``delay`` after it arrived; reading goes on meanwhile."""
    due: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

    def send() -> None:
        with contextlib.suppress(OSError):
            while True:
                when, data = due.get()
                wait = when - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=send, daemon=True).start()
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            due.put((time.monotonic() + delay, data))
    due.put((time.monotonic() + delay, b""))


def _serve(client: socket.socket, target: str, delay: float) -> None:
    try:
        upstream = _connect(target)
    except OSError:
        client.close()
        return
    threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
    if delay > 0:
        _pump_late(upstream, client, delay)
    else:
        _pump(upstream, client)


def main() -> None:
    target, delay = sys.argv[1], float(sys.argv[2])
    listening = socket.create_server(("127.0.0.1", 0))
    print(listening.getsockname()[1], flush=True)
    while True:
        client, _ = listening.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_serve, args=(client, target, delay), daemon=True).start()


if __name__ == "__main__":
    main()

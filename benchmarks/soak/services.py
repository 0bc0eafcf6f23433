"""Real services the soak runs against: moto's S3 server that can go down, a loopback proxy in front of
it that answers 503 SlowDown to a share of requests during a burst, and a small tmpfs that can be filled.
The fault tests inject their storage faults through the same ``FaultProxy``."""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import random
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

SLOWDOWN = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"


class S3Server:
    """moto's ThreadedMotoServer on a fixed loopback port; ``stop`` closes the listening socket (an outage:
    connections are refused), ``start`` serves the same buckets again (moto keeps them in this process)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._server: Any = None

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log: a line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    @property
    def up(self) -> bool:
        return self._server is not None

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            # ThreadedMotoServer.stop leaves the socket listening (clients would hang): close it.
            server._server.server_close()


@dataclass(frozen=True)
class Answer:
    """An HTTP response the proxy sends: the upstream's, or a canned one given instead of forwarding."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


FORWARD = "forward"
DROP = "drop"  # close the client's connection unanswered, as a dead endpoint would
SLOW_DOWN = Answer(503, SLOWDOWN)
Decision = Literal["forward", "drop"] | Answer
# Called on the request's own thread with its method and path; it may block to hold the request.
Decide = Callable[[str, str], Decision]


class FaultProxy:
    """An HTTP proxy on loopback in front of the S3 server at ``upstream``. ``decide`` chooses, per request,
    to forward it, drop it or answer it with a canned response. A request the upstream cannot take
    (connection refused) is dropped and counted; successful image PUTs are counted per key."""

    def __init__(self, upstream: str, decide: Decide) -> None:
        self.dropped = 0
        self.image_puts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._upstream = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                decision = decide(self.command, self.path)
                if decision == FORWARD:
                    decision = proxy._forward(self.command, self.path, body, self.headers)
                if decision == DROP:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                assert isinstance(decision, Answer), decision
                self.send_response(decision.status)
                for key, value in decision.headers:
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(decision.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(decision.body)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _forward(self, method: str, path: str, body: bytes, headers: Message) -> Answer | Literal["drop"]:
        upstream = http.client.HTTPConnection(self._upstream.hostname, self._upstream.port, timeout=30)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() != "connection"}
            upstream.request(method, path, body=body, headers=sent)
            response = upstream.getresponse()
            answer = Answer(response.status, response.read(), response.getheaders())
        except OSError:
            with self._lock:
                self.dropped += 1
            return DROP
        finally:
            upstream.close()
        if method == "PUT" and answer.status == 200 and "/images/" in path:
            with self._lock:
                self.image_puts[path] = self.image_puts.get(path, 0) + 1
        return answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ChaosProxy(FaultProxy):
    """During a burst (``burst_share`` > 0) answers that share of requests with 503 SlowDown."""

    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.burst_share = 0.0
        self.answered_503 = 0
        self._random = random.Random(seed)
        super().__init__(f"http://127.0.0.1:{upstream_port}", self._throttle)

    def _throttle(self, method: str, path: str) -> Decision:
        with self._lock:
            if self.burst_share and self._random.random() < self.burst_share:
                self.answered_503 += 1
                return SLOW_DOWN
            return FORWARD


class Tmpfs:
    """A tmpfs of ``size_bytes`` mounted on ``path`` (needs root); ``fill`` takes all its free space with
    one filler file, ``free`` deletes it."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.mounted = False
        self.filler = path / "filler.bin"

    def mount(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )
        self.mounted = True
        return self

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self) -> int:
        """Write zeros until the file system is full; returns the bytes written."""
        written = 0
        block = b"\0" * 65536
        with open(self.filler, "ab", buffering=0) as f:
            while True:
                try:
                    written += f.write(block) or 0
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            self.free()
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["umount", str(self.path)], check=True, capture_output=True)
                self.mounted = False
            if self.mounted:  # still busy: detach it now, the kernel frees it when the last user leaves
                subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
                self.mounted = False

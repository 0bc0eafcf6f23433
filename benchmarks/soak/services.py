"""Real services the soak runs against: moto's S3 server that can go down, a loopback proxy in front of
it that answers 503 SlowDown to a share of requests during a burst, and a small tmpfs that can be filled."""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import random
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

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


class ChaosProxy:
    """An HTTP proxy on loopback in front of ``upstream``. During a burst (``burst_share`` > 0) it answers
    that share of requests with 503 SlowDown; when the upstream refuses connections it closes the client's
    connection unanswered, as a dead endpoint would. Successful image PUTs are counted per key."""

    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.burst_share = 0.0
        self.answered_503 = 0
        self.dropped = 0
        self.image_puts: dict[str, int] = {}
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy._throttle():
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                except OSError:
                    with proxy._lock:
                        proxy.dropped += 1
                    self.close_connection = True
                    return
                finally:
                    upstream.close()
                if self.command == "PUT" and response.status == 200 and "/images/" in self.path:
                    with proxy._lock:
                        proxy.image_puts[self.path] = proxy.image_puts.get(self.path, 0) + 1
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _throttle(self) -> bool:
        with self._lock:
            if self.burst_share and self._random.random() < self.burst_share:
                self.answered_503 += 1
                return True
            return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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

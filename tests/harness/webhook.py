"""A webhook endpoint for the event tests: a Python `http.server` on loopback that records every POST.

It can be told to answer 500 to the first K requests, to wait before answering (a slow endpoint), to hold
every response until the test releases it (a hung endpoint), or be started only later on a port fixed in advance (an endpoint that is down at first). Each request is recorded
with its headers, its raw body and the status it got, so a test can check the signature over the exact bytes
and reassemble the stream of events the relay considers delivered (those in requests answered 2xx).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .relay import free_port

HOLD_MAX = 30.0  # seconds a held response waits at most for release()


@dataclass
class HookRequest:
    n: int  # arrival order, from 1
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the endpoint answers (decided on arrival)
    answered: bool = False  # the response has been written

    @property
    def events(self) -> list:
        doc = json.loads(self.body)
        assert isinstance(doc, list), f"webhook body is not a JSON array: {self.body[:300]!r}"
        return doc


def signature_ok(secret: bytes, req: HookRequest) -> bool:
    """X-Herald-Signature == v1=<hex HMAC-SHA256(secret, "<X-Herald-Timestamp>.<body>")>."""
    ts = req.headers.get("x-herald-timestamp")
    sig = req.headers.get("x-herald-signature")
    if ts is None or sig is None:
        return False
    want = "v1=" + hmac.new(secret, ts.encode() + b"." + req.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, sig)


class WebhookReceiver:
    def __init__(self, port: int | None = None, fail_first: int = 0, delay: float = 0.0, path: str = "/hook",
                 hold: bool = False):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.path = path
        self.fail_first = fail_first
        self.delay = delay
        # hold=True: every response waits until release() (bounded by HOLD_MAX), an endpoint that hangs
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.requests: list[HookRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> "WebhookReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    n = len(receiver.requests) + 1
                    status = 500 if n <= receiver.fail_first else 200
                    req = HookRequest(n, self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    receiver.requests.append(req)
                receiver.gate.wait(HOLD_MAX)
                if receiver.delay:
                    time.sleep(receiver.delay)
                payload = b"failing on purpose\n" if status >= 300 else b"ok\n"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                self.wfile.flush()
                with receiver._lock:
                    req.answered = True

            def log_message(self, *args):  # keep the test output clean
                pass

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="webhook", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Let held responses (hold=True) go, and every later one at once."""
        self.gate.set()

    def stop(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(10)

    # -- what arrived ----------------------------------------------------------------------------------

    def all_requests(self) -> list[HookRequest]:
        with self._lock:
            return list(self.requests)

    def received_events(self) -> list[dict]:
        """Every event in every request read so far, accepted or not, in arrival order."""
        return [e for r in self.all_requests() for e in r.events]

    def delivered_events(self) -> list[dict]:
        """The events of the requests answered 2xx, in arrival order: what the relay may consider delivered."""
        return [e for r in self.all_requests() if 200 <= r.status < 300 and r.answered for e in r.events]

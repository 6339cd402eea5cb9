"""A static JSON document server on loopback (the standard library's HTTP server in a thread).

It serves what a test puts in `docs` (path -> JSON), and counts requests per path: the IdP
discovery document and JWKS that tests of the control plane's fetching read. It is not an IdP
(it signs nothing and runs no login); the e2e tests use a real one.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class DocServer:
    def __init__(self, httpd: ThreadingHTTPServer) -> None:
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self.docs: dict[str, Any] = {}
        self.hits: Counter[str] = Counter()


@contextmanager
def running_docserver() -> Iterator[DocServer]:
    holder: list[DocServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            srv = holder[0]
            srv.hits[self.path] += 1
            if self.path not in srv.docs:
                self.send_error(404)
                return
            body = json.dumps(srv.docs[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(DocServer(httpd))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

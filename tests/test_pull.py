"""`ggufrun pull` against a local HTTP server: hf:// URLs, resume after a dropped connection, sha256."""
from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from ggufrun import hub

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /ORG/REPO/resolve/REV/FILE with Range support; drops the first full download."""
    drops_left = 0
    requests: list = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append((self.path, self.headers.get("Range")))
        if not self.path.startswith("/acme/tiny/resolve/main/"):
            self.send_error(404, "not found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).drops_left > 0:
            type(self).drops_left -= 1
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-transfer
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    monkeypatch.setenv("GGUFRUN_HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.setenv("GGUFRUN_HOME", str(tmp_path / "home"))
    RangeHandler.requests = []
    yield srv
    srv.shutdown()


def test_hf_download_and_cache(server):
    RangeHandler.drops_left = 0
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    path = hub.pull("hf://acme/tiny/model.gguf", quiet=True, sha256=sha)
    assert path.read_bytes() == PAYLOAD
    assert path == hub.cached_path("hf://acme/tiny/model.gguf")
    # resolve() finds it in the cache without another request
    n = len(RangeHandler.requests)
    assert hub.resolve("hf://acme/tiny/model.gguf", quiet=True) == path
    assert len(RangeHandler.requests) == n


def test_dropped_connection_resumes_with_range(server):
    RangeHandler.drops_left = 1
    with pytest.raises(hub.PullError, match="connection closed after .* run the pull again to resume"):
        hub.pull("hf://acme/tiny/model.gguf", quiet=True)
    part = hub.cached_path("hf://acme/tiny/model.gguf").with_name("model.gguf.part")
    have = part.stat().st_size
    assert 0 < have < len(PAYLOAD)
    path = hub.pull("hf://acme/tiny/model.gguf", quiet=True, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert path.read_bytes() == PAYLOAD
    assert RangeHandler.requests[-1][1] == f"bytes={have}-"
    assert not part.exists()


def test_sha_mismatch_discards(server):
    RangeHandler.drops_left = 0
    with pytest.raises(hub.PullError, match="sha256 mismatch"):
        hub.pull("hf://acme/tiny/model.gguf", quiet=True, sha256="0" * 64)
    target = hub.cached_path("hf://acme/tiny/model.gguf")
    assert not target.exists() and not target.with_name("model.gguf.part").exists()


def test_http_errors_are_clear(server):
    with pytest.raises(hub.PullError, match="HTTP 404"):
        hub.pull("hf://acme/other/model.gguf", quiet=True)
    with pytest.raises(hub.PullError, match="expected hf://ORG/REPO/FILE.gguf"):
        hub.pull("hf://acme/model.gguf", quiet=True)


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv("GGUFRUN_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a known model name"):
        hub.resolve("no-such-model")
    with pytest.raises(hub.PullError, match="not in the cache"):
        hub.resolve("gemma3-270m", pull_missing=False)

"""The corpus catalog over real HTTP: a loopback server that this file starts serves generated
files, and every failure must leave no file behind and say so in one line."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SHARED_CORPORA

from charlm.data import catalog
from charlm.data.catalog import Entry
from charlm.data.text import read_text, sha256_file
from charlm.errors import CharlmError

HEADER = "《演义》（精校版）\n \n内容简介\n\n目录：第一回至第三回\n\n".encode()
BODY = "第一回 宴桃园\n\n话说天下大势，分久必合，合久必分。\n第二回 张翼德\n（完）\n".encode() * 50
HAS_SHARED = (SHARED_CORPORA / "sanguo.txt").exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the server's `routes`: path -> (behaviour, body). "ok" sends the body, "drop"
    announces its length but closes after half, "stall" sends nothing until released."""

    def do_GET(self) -> None:
        behaviour, body = self.server.routes.get(self.path, ("missing", b""))
        if behaviour == "missing":
            self.send_error(404, "Not Found")
            return
        if behaviour == "stall":
            self.server.release.wait(30)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if behaviour == "ok" else body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Server:
    url: str
    routes: dict[str, tuple[str, bytes]]


@pytest.fixture
def server() -> Iterator[Server]:
    """An HTTP server on 127.0.0.1 (a free port) in a thread, for this test only."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes = {}
    httpd.release = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.routes)
    finally:
        httpd.release.set()
        httpd.shutdown()
        httpd.server_close()


def demo_catalog(url: str, download: bytes = HEADER + BODY) -> dict[str, Entry]:
    """A catalog of one corpus, `demo`, whose download has a header before 第一回."""
    entry = Entry(
        name="demo",
        description="a generated novel",
        language="zh-Hans",
        licence="public domain",
        url=url,
        download_sha256=hashlib.sha256(download).hexdigest(),
        download_size=len(download),
        normalise=({"drop_lines_before_prefix": "第一回"},),
        sha256=hashlib.sha256(BODY).hexdigest(),
        size=len(BODY),
    )
    return {"demo": entry}


def fails_cleanly(*fragments: str, **options: object) -> str:
    """Fetch `demo`; it must fail with one line holding `fragments` and leave no file."""
    with pytest.raises(CharlmError) as caught:
        catalog.get("demo", progress=False, **options)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not catalog.local_path("demo").exists()
    assert list(catalog.data_dir().iterdir()) == []  # no .part file either
    return message


def test_download_is_verified_normalised_and_installed(server: Server):
    server.routes["/demo.txt"] = ("ok", HEADER + BODY)
    demo = demo_catalog(server.url + "/demo.txt")
    fetched = catalog.get("demo", catalog=demo, progress=False)
    assert fetched.path == catalog.local_path("demo")
    assert fetched.path.read_bytes() == BODY
    assert fetched.sha256 == demo["demo"].sha256 == sha256_file(fetched.path)
    assert "sha256 verified" in fetched.origin and server.url in fetched.origin
    assert sorted(p.name for p in catalog.data_dir().iterdir()) == ["demo.txt"]
    # Present and intact: kept, not downloaded again.
    server.routes.clear()
    again = catalog.get("demo", catalog=demo, progress=False)
    assert again.origin.startswith("already here")


def test_a_damaged_local_copy_is_fetched_again(server: Server):
    server.routes["/demo.txt"] = ("ok", HEADER + BODY)
    demo = demo_catalog(server.url + "/demo.txt")
    catalog.data_dir().mkdir(parents=True)
    catalog.local_path("demo").write_bytes(BODY[:-1])
    assert catalog.local_state(demo["demo"]) == "modified"
    catalog.get("demo", catalog=demo, progress=False)
    assert catalog.local_state(demo["demo"]) == "present"


def test_checksum_mismatch(server: Server):
    server.routes["/demo.txt"] = ("ok", HEADER + BODY.replace("合久必分".encode(), b"X"))
    demo = demo_catalog(server.url + "/demo.txt")
    fails_cleanly("sha256 of the download", "nothing was kept", catalog=demo)


def test_http_404(server: Server):
    fails_cleanly("HTTP 404", "/gone.txt", catalog=demo_catalog(server.url + "/gone.txt"))


def test_connection_dropped_mid_transfer(server: Server):
    server.routes["/demo.txt"] = ("drop", HEADER + BODY)
    demo = demo_catalog(server.url + "/demo.txt")
    fails_cleanly("closed early", catalog=demo)


def test_time_out(server: Server):
    server.routes["/demo.txt"] = ("stall", b"")
    demo = demo_catalog(server.url + "/demo.txt")
    started = time.monotonic()
    fails_cleanly("timed out", "0.3 s", catalog=demo, timeout=0.3)
    assert time.monotonic() - started < 5


def test_ctrl_c_during_a_download(server: Server, monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C arrives as KeyboardInterrupt after the first block is written to the .part file."""

    class InterruptedBar:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> InterruptedBar:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            assert catalog.local_path("demo").with_suffix(".txt.part").stat().st_size > 0
            raise KeyboardInterrupt

    monkeypatch.setattr(catalog, "tqdm", InterruptedBar)
    server.routes["/demo.txt"] = ("ok", HEADER + BODY)
    fails_cleanly("interrupted", catalog=demo_catalog(server.url + "/demo.txt"))


def test_mirror_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A mirror holds the final files: no normalisation, the final sha256 is checked."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv(catalog.MIRROR_VARIABLE, str(mirror))
    demo = demo_catalog("http://127.0.0.1:9/unreachable.txt")
    fails_cleanly("mirror has no demo.txt", catalog=demo)
    (mirror / "demo.txt").write_bytes(HEADER + BODY)  # not the final file
    fails_cleanly("sha256 of the corpus", catalog=demo)
    (mirror / "demo.txt").write_bytes(BODY)
    fetched = catalog.get("demo", catalog=demo, progress=False)
    assert fetched.path.read_bytes() == BODY and str(mirror) in fetched.origin


def test_mirror_url(server: Server, monkeypatch: pytest.MonkeyPatch):
    server.routes["/mirror/demo.txt"] = ("ok", BODY)
    monkeypatch.setenv(catalog.MIRROR_VARIABLE, server.url + "/mirror/")
    demo = demo_catalog("http://127.0.0.1:9/unreachable.txt")
    fetched = catalog.get("demo", catalog=demo, progress=False)
    assert fetched.path.read_bytes() == BODY
    assert fetched.origin.startswith(f"from {server.url}/mirror/demo.txt")
    fetched.path.unlink()
    server.routes.clear()
    fails_cleanly("HTTP 404", catalog=demo)


def shared_bytes(name: str) -> bytes:
    return (SHARED_CORPORA / f"{name}.txt").read_bytes()


@pytest.mark.skipif(not HAS_SHARED, reason="needs ../shared/corpora")
@pytest.mark.parametrize("via", ["directory", "url"])
def test_real_entries_through_a_mirror_of_the_shared_corpora(
    via: str, server: Server, monkeypatch: pytest.MonkeyPatch
):
    """The catalog's sanguo and tinyshakespeare, served from ../shared/corpora, match their
    final sha256, size and character counts."""
    if via == "directory":
        monkeypatch.setenv(catalog.MIRROR_VARIABLE, str(SHARED_CORPORA))
    else:
        for name in ("sanguo", "tinyshakespeare"):
            server.routes[f"/corpora/{name}.txt"] = ("ok", shared_bytes(name))
        monkeypatch.setenv(catalog.MIRROR_VARIABLE, server.url + "/corpora")
    entries = catalog.load_catalog()
    for name in ("sanguo", "tinyshakespeare"):
        entry = entries[name]
        fetched = catalog.get(name, progress=False)
        assert sha256_file(fetched.path) == entry.sha256
        assert fetched.size == entry.size
        text = read_text(fetched.path)
        assert (len(text), len(set(text))) == (entry.characters, entry.distinct_characters)
        assert catalog.local_state(entry) == "present"
    assert {p.name for p in catalog.data_dir().iterdir()} == {"sanguo.txt", "tinyshakespeare.txt"}


def test_drop_lines_before_prefix_on_a_generated_file():
    """The header, including a line that mentions 第一回 without starting with it, goes; every
    byte from the first line that starts with 第一回 stays."""
    assert catalog.drop_lines_before_prefix(HEADER + BODY, "第一回") == BODY
    assert catalog.drop_lines_before_prefix(BODY, "第一回") == BODY
    with pytest.raises(CharlmError, match="no line starts with"):
        catalog.drop_lines_before_prefix(HEADER, "第一回")
    with pytest.raises(CharlmError, match="upgrade charlm"):
        catalog.normalise(BODY, ({"translate": "en"},))


def test_the_catalog_file():
    entries = catalog.load_catalog()
    assert list(entries) == ["sanguo", "tinyshakespeare", "addition"]
    for entry in entries.values():
        assert entry.description and entry.language and entry.licence
        if entry.generated:
            assert entry.url is None and entry.defaults
            continue
        # Pinned to an immutable revision: a full commit hash in the URL.
        assert re.search(r"/[0-9a-f]{40}/", entry.url), entry.url
        for digest in (entry.download_sha256, entry.sha256):
            assert re.fullmatch(r"[0-9a-f]{64}", digest)
        assert entry.size and entry.characters and entry.download_size >= entry.size
    assert entries["sanguo"].normalise == ({"drop_lines_before_prefix": "第一回"},)
    assert entries["sanguo"].sha256.startswith("447b1bb8")
    assert entries["tinyshakespeare"].sha256 == entries["tinyshakespeare"].download_sha256


def test_resolve_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    own = tmp_path / "own.txt"
    own.write_text("text\n", encoding="utf-8")
    assert catalog.resolve_corpus(str(own)) == str(own)
    with pytest.raises(CharlmError) as caught:
        catalog.resolve_corpus("no-such-corpus")
    assert "no such file: no-such-corpus" in str(caught.value)
    assert "sanguo, tinyshakespeare, addition" in str(caught.value)
    # A catalog name: generated (or fetched) when missing, then used as it is.
    path = catalog.resolve_corpus("addition", progress=False)
    assert path == str(catalog.local_path("addition"))
    lines = Path(path).read_text().splitlines()
    assert len(lines) == catalog.load_catalog()["addition"].defaults["lines"]


def test_generator_options_are_checked():
    with pytest.raises(CharlmError, match="--bits apply only to addition"):
        catalog.get("sanguo", bits=4)
    with pytest.raises(CharlmError, match="has no option --width"):
        catalog.get("addition", width=4)
    assert list(catalog.data_dir().iterdir()) == []

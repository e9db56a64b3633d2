"""charlm serve: the HTTP API end to end against a real `charlm serve` process, every bad
request answered as JSON naming its field, clients served at once, a client that leaves
stopping its work, and the page in a headless browser."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from conftest import mixed_text

from charlm.checkpoints import file_format as ckpt
from charlm.cli import main
from charlm.inference.evaluation import perplexity
from charlm.inference.sampling import Sampler

# Long enough that a generation nobody stopped would run on for many seconds.
MAX_LENGTH = 1_000_000
MAX_SAMPLES = 4
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


class Server:
    """`charlm serve` in a subprocess, on a free port that it picks (--port 0) and prints."""

    def __init__(self, cwd: Path, *args: str):
        self.stderr_path = cwd / "stderr.txt"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "charlm", "serve", "--port", "0", *args],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                encoding="utf-8",
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stopped: tuple[int, str, str] | None = None
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.ready = self.lines.get(timeout=120)
        except queue.Empty:
            self.ready = None
        if not self.ready:
            self.stop()
            pytest.fail(f"charlm serve did not start:\n{self.stderr_path.read_text()}")
        self.url = re.search(r" at (http://\S+) ", self.ready).group(1)

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, **{"timeout": 30, **kwargs})

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, **{"timeout": 60, **kwargs})

    def stop(self) -> tuple[int, str, str]:
        """Ctrl-C, as at a terminal: the exit status, what it printed after the ready line,
        and its stderr. Stopping a stopped server gives the same again."""
        if self.stopped is not None:
            return self.stopped
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            status = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(timeout=10)
        printed = []
        while (line := self.lines.get(timeout=10)) is not None:
            printed.append(line)
        self.stopped = status, "".join(printed), self.stderr_path.read_text()
        return self.stopped


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    limits = ["--max-length", str(MAX_LENGTH), "--max-samples", str(MAX_SAMPLES)]
    running = Server(tmp_path_factory.mktemp("serve"), "-c", str(trained_run), *limits)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sampler(trained_run: Path) -> Sampler:
    return Sampler.load(trained_run)


def expected(sampler: Sampler, prime: str, **options: Any) -> list[str]:
    """The whole of each sample, as the library gives it."""
    texts: list[str] = []
    for pieces in sampler.stream(prime, **options):
        texts = [a + b for a, b in zip(texts, pieces)] if texts else pieces
    return texts


def read_events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event; every event has one data line."""
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
            name = "message"


def health(server: Server) -> dict[str, Any]:
    return server.get("v1/health").json()


def test_ready_line_names_the_checkpoint_and_says_there_is_no_authentication(
    server: Server, trained_run: Path
):
    assert str(ckpt.resolve(trained_run)) in server.ready
    assert "http://127.0.0.1:" in server.ready and "no authentication" in server.ready


def test_sample_is_the_library_sample(server: Server, sampler: Sampler):
    options = dict(length=150, seed=7, num_samples=2, temperature=0.9, top_k=5)
    answer = server.post("v1/sample", json={"prime": "出战", **options})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["samples"] == expected(sampler, "出战", **options)
    assert body["prime"] == "出战" and body["seed"] == 7 and len(body["samples"][0]) == 152

    # Without a seed the server draws one and says which: asking with it gives the same text.
    drawn = server.post("v1/sample", json={"prime": "the", "length": 40}).json()
    again = server.post("v1/sample", json={"prime": "the", "length": 40, "seed": drawn["seed"]})
    assert again.json()["samples"] == drawn["samples"]


def test_unknown_prime_characters_can_be_dropped(server: Server, sampler: Sampler):
    body = {"prime": "将Ω军", "length": 30, "seed": 2, "drop_unknown": True}
    answer = server.post("v1/sample", json=body).json()
    assert answer["prime"] == "将军"
    assert answer["samples"] == expected(sampler, "将军", length=30, seed=2)


def test_streaming_sends_each_piece_then_done(server: Server, sampler: Sampler):
    body = {"prime": "将军", "length": 200, "seed": 1, "stream": True}
    with httpx.stream("POST", server.url + "v1/sample", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(response))
    assert events[0] == ("message", {"pieces": ["将军"]})
    # The prime shares the first compiled chunk of 64 with 62 generated characters.
    assert [len(data["pieces"][0]) for _, data in events[1:-1]] == [62, 64, 64, 10]
    name, done = events[-1]
    assert name == "done" and done["seed"] == 1 and done["length"] == 200
    text = "".join(data["pieces"][0] for _, data in events[:-1])
    assert [text] == expected(sampler, "将军", length=200, seed=1)


def test_perplexity_is_the_perplexity_command(server: Server, trained_run: Path, tmp_path: Path):
    text = mixed_text(lines=30, seed=5) + "Ω!\n"
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    want = perplexity(trained_run, path)
    answer = server.post("v1/perplexity", json={"text": text})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["characters"] == want.characters
    assert got["nats_per_char"] == pytest.approx(want.nats_per_char, rel=1e-6)
    assert got["bits_per_char"] == pytest.approx(want.bits_per_char, rel=1e-6)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert got["unknown"] == {"Ω": 1, "!": 1} and got["unknown_characters"] == 2


def test_model_description(server: Server, trained_run: Path, sampler: Sampler):
    model = server.get("v1/model").json()
    assert model["cell"] == "lstm" and model["layers"] == 2 and model["hidden_size"] == 32
    assert model["vocab_size"] == len(sampler.vocab.chars) and model["step"] == 60
    assert model["checkpoint"] == str(ckpt.resolve(trained_run))
    assert model["max_length"] == MAX_LENGTH and model["max_samples"] == MAX_SAMPLES


BAD_SAMPLES = [
    ({"prime": "出战Ω"}, "prime"),
    ({"length": MAX_LENGTH + 1}, "length"),
    ({"length": -1}, "length"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"num_samples": MAX_SAMPLES + 1}, "num_samples"),
    ({"num_samples": 0}, "num_samples"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -3}, "seed"),
    ({"length": "long"}, "length"),
    ({"length": 2.5}, "length"),
    ({"temperature": "hot"}, "temperature"),
    ({"greedy": "yes"}, "greedy"),
    ({"prime": 12}, "prime"),
    ({"temprature": 0.5}, "temprature"),
]


def assert_error(answer: httpx.Response, status: int, field: str | None) -> None:
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert set(error) == {"error", "field"} and error["field"] == field
    assert error["error"] and "\n" not in error["error"]


@pytest.mark.parametrize(("body", "field"), BAD_SAMPLES, ids=[f for _, f in BAD_SAMPLES])
def test_bad_sample_requests_name_the_field(server: Server, body: dict[str, Any], field: str):
    assert_error(server.post("v1/sample", json=body), 422, field)
    assert_error(server.post("v1/sample", json={**body, "stream": True}), 422, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"temperature": 1e999}', "temperature"),
        (b'{"temperature": Infinity}', "temperature"),
        (b'{"top_k": 2147483648}', "top_k"),
    ],
)
def test_numbers_out_of_range_are_422_naming_the_field(server: Server, body: bytes, field: str):
    """They were generated and then failed with a 500 (with a bare Infinity in the last
    streamed event), or overflowed to a 500."""
    json_type = {"Content-Type": "application/json"}
    assert_error(server.post("v1/sample", content=body, headers=json_type), 422, field)
    streamed = body[:-1] + b', "stream": true}'
    assert_error(server.post("v1/sample", content=streamed, headers=json_type), 422, field)


def test_other_bad_requests(server: Server):
    json_type = {"Content-Type": "application/json"}
    assert_error(server.post("v1/sample", content=b"{not json", headers=json_type), 400, "body")
    # These were 400s naming no field.
    not_utf8 = b'{"prime": "\xff\xfe"}'
    assert_error(server.post("v1/sample", content=not_utf8, headers=json_type), 400, "body")
    deep = b"[" * 100_000 + b"]" * 100_000
    assert_error(server.post("v1/sample", content=deep, headers=json_type), 400, "body")
    assert_error(server.post("v1/sample", content=b"[1, 2]", headers=json_type), 422, "body")
    assert_error(server.post("v1/sample", content=b"", headers=json_type), 422, "body")
    assert_error(server.post("v1/perplexity", json={"text": 5}), 422, "text")
    assert_error(server.post("v1/perplexity", json={}), 422, "text")
    assert_error(server.post("v1/perplexity", json={"text": "ΩΩΩ"}), 422, "text")
    assert_error(server.get("nowhere"), 404, None)
    assert_error(server.get("v1/sample"), 405, None)
    # Bound to loopback, it answers only to local host names (no DNS rebinding).
    assert_error(server.get("v1/model", headers={"Host": "evil.example:80"}), 403, None)
    assert health(server)["ok"]


def test_eight_clients_at_once_each_get_their_own_text(server: Server, sampler: Sampler):
    seeds = range(8)
    want = {seed: expected(sampler, "the ", length=3000, seed=seed)[0] for seed in seeds}
    start = threading.Barrier(len(seeds))

    def client(seed: int) -> tuple[str, float, float]:
        """The text, when the first generated piece came, and when the stream ended."""
        body = {"prime": "the ", "length": 3000, "seed": seed, "stream": True}
        text, first = "", None
        with httpx.Client(timeout=60) as http:
            start.wait()
            with http.stream("POST", server.url + "v1/sample", json=body) as response:
                for name, data in read_events(response):
                    if name == "message":
                        text += data["pieces"][0]
                        if first is None and len(text) > len("the "):
                            first = time.monotonic()
        return text, first, time.monotonic()

    with ThreadPoolExecutor(len(seeds)) as pool:
        results = dict(zip(seeds, pool.map(client, seeds)))
    for seed in seeds:
        assert results[seed][0] == want[seed], f"seed {seed}"
    # Served at once, not one after another: every client had text before any had finished.
    assert max(first for _, first, _ in results.values()) < min(
        end for _, _, end in results.values()
    )


def wait_until_idle(server: Server, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (now := health(server))["generating"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def test_a_client_that_leaves_mid_stream_stops_its_generation(server: Server):
    before = wait_until_idle(server)["chunks"]
    body = {"prime": "the", "length": MAX_LENGTH, "seed": 3, "stream": True}
    with httpx.stream("POST", server.url + "v1/sample", json=body, timeout=60) as response:
        events = read_events(response)  # (dropping it would close the connection)
        for _ in range(4):
            next(events)
        assert health(server)["generating"] == 1
    # The connection is closed with nearly all of the million characters unread.
    after = wait_until_idle(server)
    assert after["generating"] == 0
    time.sleep(0.3)
    assert health(server)["chunks"] == after["chunks"]
    assert after["chunks"] - before < MAX_LENGTH // 64 // 20


def test_a_client_that_gives_up_waiting_stops_its_generation(server: Server):
    body = {"prime": "the", "length": MAX_LENGTH, "seed": 4}
    with pytest.raises(httpx.ReadTimeout):
        server.post("v1/sample", json=body, timeout=httpx.Timeout(30, read=0.5))
    after = wait_until_idle(server)
    assert after["generating"] == 0
    time.sleep(0.3)
    assert health(server)["chunks"] == after["chunks"]


def test_page_is_self_contained(server: Server):
    page = server.get("")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="generate"' in page.text and 'id="output"' in page.text
    assert "http://" not in page.text and "https://" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_page_streams_in_a_headless_browser(server: Server, tmp_path: Path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CHARLM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CHARLM_REQUIRE_BROWSER=1 but the browser is missing: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.05)
        # The length of the output at each change, recorded in the page (WebDriver's .text
        # reads a large element slowly).
        driver.execute_script(
            "window.lengths = []; const output = document.getElementById('output');"
            "new MutationObserver(() => window.lengths.push(output.textContent.length))"
            ".observe(output, {childList: true, characterData: true, subtree: true});"
        )

        def output(script: str) -> Any:
            return driver.execute_script(f"return document.getElementById('output').{script}")

        def set_value(element_id: str, value: str) -> None:
            field = driver.find_element(By.ID, element_id)
            field.clear()
            field.send_keys(value)

        set_value("prime", "the army")
        set_value("length", str(MAX_LENGTH))
        driver.find_element(By.ID, "generate").click()
        # A million characters take the tiny model half a minute: text shows as it streams.
        wait.until(lambda _: output("textContent.length") > 5000)
        assert output("textContent.slice(0, 8)") == "the army"
        lengths = driver.execute_script("return window.lengths")
        assert len(lengths) >= 3 and lengths == sorted(lengths)
        driver.find_element(By.ID, "stop").click()
        wait.until(lambda _: driver.find_element(By.ID, "status").text == "stopped")
        assert wait_until_idle(server)["generating"] == 0  # Stop ended the generation

        # An error from the API is shown in the page, naming the field.
        set_value("prime", "the Ω")
        driver.find_element(By.ID, "generate").click()
        error = driver.find_element(By.ID, "error")
        wait.until(lambda _: error.is_displayed() and error.text.startswith("prime:"))
    finally:
        driver.quit()


def test_an_unexpected_error_is_a_500_and_the_server_goes_on(sampler: Sampler):
    from charlm.inference.server import create_app

    def broken_stream(prime: str, **options: Any) -> Iterator[list[str]]:
        yield [prime]
        raise RuntimeError("boom")

    broken = Sampler(sampler.params, sampler.config, sampler.vocab)
    broken.stream = broken_stream
    app = create_app(broken, max_length=100, max_samples=1, source={})

    async def requests() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            plain = await client.post("/v1/sample", json={"prime": "the", "length": 10})
            streamed = await client.post("/v1/sample", json={"length": 10, "stream": True})
            return plain, streamed, await client.get("/v1/health")

    plain, streamed, after = asyncio.run(requests())
    assert_error(plain, 500, None)
    assert "RuntimeError: boom" in plain.json()["error"]
    # A stream has sent its status already: the error is its last event.
    events = list(read_events(streamed))
    assert events[0][0] == "message" and events[-1][0] == "error"
    assert after.json() == {"ok": True, "generating": 0, "chunks": 0}


def test_cli_errors_are_one_line(trained_run: Path):
    missing = CliRunner().invoke(main, ["serve", "-c", "nowhere.ckpt", "--port", "0"])
    assert missing.exit_code == 1
    assert missing.stderr.strip().splitlines() == ["charlm: error: no checkpoint at nowhere.ckpt"]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(main, ["serve", "-c", str(trained_run), "--port", str(port)])
    assert busy.exit_code == 1
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"charlm: error: cannot listen on 127.0.0.1:{port}"
    )

    shown = CliRunner().invoke(main, ["serve", "--help"], terminal_width=100).stdout
    assert "no authentication" in shown and "--host" in shown


def test_ctrl_c_stops_the_server_cleanly(server: Server):
    status, printed, stderr = server.stop()
    assert status == 0, stderr
    assert printed.strip() == "stopped"
    assert "Traceback" not in stderr


def test_serve_help_does_not_import_the_server():
    code = (
        "import sys; from charlm.cli import main; "
        "main(['serve', '--help'], standalone_mode=False); "
        "print(sorted({'jax', 'fastapi', 'uvicorn'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"

"""The REST server against hostile clients: bad lengths, huge claims, chunked bodies, deep JSON,
idle, slow and trickling connections, more connections than allowed; and a fault test where good
clients keep getting answers while a bounded hostile fleet runs. HTTP parse errors carry
aiohttp's (llhttp's) words. Start and stop: bad settings, busy ports and unknown hosts refused
before any model loads; SIGTERM and Ctrl-C let a request in progress finish."""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from deploy.serving import make_server
from deploy.serving.routes import json_depth
from kcp import cli
from kcp.core.errors import UserError

LIMIT = 64 * 1024


def digit_png() -> bytes:
    image = np.zeros((8, 8), np.uint8)
    image[1:7, 3:5] = 255  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


BODY = json.dumps({"instances": [{"b64": base64.b64encode(digit_png()).decode()}]}).encode()
PATH = "/v1/models/model:predict"


@pytest.fixture(scope="module")
def hostile_server(digits_run):
    httpd = make_server(digits_run, "127.0.0.1", 0, max_request_bytes=LIMIT, max_connections=12,
                        idle_timeout_s=1.0, allow_unvalidated=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield httpd.server_address[1], httpd
    httpd.shutdown()
    httpd.server_close()


def exchange(port: int, data: bytes, timeout: float = 10.0, send_delay: float = 0.0) -> bytes:
    """Sends raw bytes, returns everything the server sends until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if send_delay:
            time.sleep(send_delay)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def request(headers: str, body: bytes = b"", path: str = PATH, close: bool = True) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}" + ("Connection: close\r\n" if close else "") + "\r\n"
    return head.encode() + body


def responses(raw: bytes) -> list[tuple[int, dict]]:
    """The (status, JSON body) of each HTTP/1.1 response in `raw`."""
    answers = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = int(next(line.split(":")[1] for line in lines if line.lower().startswith("content-length")))
        answers.append((int(lines[0].split()[1]), json.loads(rest[:length])))
        raw = rest[length:]
    return answers


def good_predict(port: int) -> tuple[int, dict]:
    return responses(exchange(port, request(f"Content-Length: {len(BODY)}\r\n", BODY)))[0]


@pytest.mark.parametrize("length", ["-1", "abc", "1e3", " 12 x", "99999999999999999999999"])
def test_invalid_content_length_is_400_without_reading(hostile_server, length):
    port, _ = hostile_server
    [(code, body)] = responses(exchange(port, request(f"Content-Length: {length}\r\n", b"x" * 100, close=False)))
    assert code == 400 and "Content-Length" in body["error"]


def test_conflicting_lengths_and_both_framings_are_400(hostile_server):
    port, _ = hostile_server
    duplicate = request("Content-Length: 5\r\nContent-Length: 6\r\n", b"{}", close=False)
    [(code, body)] = responses(exchange(port, duplicate))
    assert code == 400 and "Duplicate Content-Length" in body["error"]
    [(code, body)] = responses(exchange(port, request("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                                      b"0\r\n\r\n", close=False)))
    assert code == 400 and "Transfer-Encoding" in body["error"] and "Content-Length" in body["error"]
    # a request whose last transfer coding is not chunked has no knowable length: 400 (RFC 9112 6.3)
    [(code, body)] = responses(exchange(port, request("Transfer-Encoding: gzip\r\n", b"", close=False)))
    assert code == 400 and "Transfer-Encoding" in body["error"]


@pytest.mark.parametrize("raw, code", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /v1/models/model HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431),
    (b"OPTIONS /v1/models/model HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # TF Serving's "Malformed request"
])
def test_protocol_errors_are_json_too(hostile_server, raw, code):
    port, _ = hostile_server
    [(status, body)] = responses(exchange(port, raw))
    assert status == code and body["error"]


def test_a_huge_claimed_length_is_413_at_once_and_the_connection_closed(hostile_server):
    port, _ = hostile_server
    start = time.monotonic()
    raw = exchange(port, request("Content-Length: 1000000000000\r\n", b"{", close=False), timeout=5)
    [(code, body)] = responses(raw)  # one answer, then the server closed the connection
    assert code == 413 and "exceeds the limit" in body["error"] and time.monotonic() - start < 2


def test_chunked_bodies_are_read_and_limited(hostile_server):
    port, _ = hostile_server
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(BODY[i:i + 100]), BODY[i:i + 100]) for i in range(0, len(BODY), 100))
    chunked = request("Transfer-Encoding: chunked\r\n", chunks + b"0\r\n\r\n", close=False)
    # the same connection then carries a second request: the chunks are never parsed as one
    follow = b"GET /v1/models/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answers = responses(exchange(port, chunked + follow))
    assert [code for code, _ in answers] == [200, 200]
    assert answers[0][1] == good_predict(port)[1] and "model_version_status" in answers[1][1]
    big = b"%x\r\n%s\r\n" % (LIMIT, b"x" * LIMIT) * 2
    [(code, body)] = responses(exchange(port, request("Transfer-Encoding: chunked\r\n", big + b"0\r\n\r\n",
                                                      close=False)))
    assert code == 413 and "exceeds the limit" in body["error"]
    [(code, body)] = responses(exchange(port, request("Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n")))
    assert code == 400 and "chunk size" in body["error"]


def test_a_malformed_chunk_after_the_headers_is_400_at_once(hostile_server):
    """The bad chunk arrives while the body is being read: answered at once, not after the timeout."""
    port, _ = hostile_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request("Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n", close=False))
        time.sleep(0.3)
        start = time.monotonic()
        sock.sendall(b"zz\r\n{}\r\n0\r\n\r\n")
        raw = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
    [(code, body)] = responses(raw)
    assert code == 400 and "malformed request body" in body["error"] and time.monotonic() - start < 0.9


def test_expect_100_continue_only_under_the_limit(hostile_server):
    """curl sends `Expect: 100-continue` before bodies over 1 MB and waits for the go-ahead."""
    port, _ = hostile_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request(f"Content-Length: {len(BODY)}\r\nExpect: 100-continue\r\n"))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(BODY)
        raw = b"".join(iter(lambda: sock.recv(65536), b""))
    assert responses(raw) == [good_predict(port)]
    refused = exchange(port, request(f"Content-Length: {LIMIT + 1}\r\nExpect: 100-continue\r\n"))
    assert b"100 Continue" not in refused and responses(refused)[0][0] == 413


@pytest.mark.parametrize("depth", [65, 5000])
def test_deep_json_is_400(hostile_server, depth):
    port, _ = hostile_server
    deep = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    [(code, body)] = responses(exchange(port, request(f"Content-Length: {len(deep)}\r\n", deep)))
    assert code == 400 and "nested deeper than 64" in body["error"]
    strings = json.dumps({"instances": ["[" * 5000]}).encode()  # brackets inside strings are not nesting
    [(code, body)] = responses(exchange(port, request(f"Content-Length: {len(strings)}\r\n", strings)))
    assert code == 400 and "nested" not in body["error"]  # the model's own answer: not an image


@pytest.mark.parametrize("document, depth", [
    ([[[1]]] * 70, 3),
    ({"a": ["[" * 70, '\\"[[', "\\\\", [[[1]]]]}, 5),  # brackets, escaped quotes and backslashes in strings
    ([{"b": [[1] * 3]}] * 30, 4),
])
def test_json_depth_counts_only_structure(document, depth):
    raw = json.dumps(document).encode()
    assert json_depth(raw) == depth and json.loads(raw) == document


def test_idle_and_slow_connections_are_closed(hostile_server):
    port, _ = hostile_server
    start = time.monotonic()
    assert exchange(port, b"", timeout=5) == b""  # idle: closed after the 1 s idle timeout, no answer
    assert exchange(port, request(f"Content-Length: {len(BODY)}\r\n", BODY[:10]), timeout=5) == b""  # never finished
    assert time.monotonic() - start < 4


def trickle(sock: socket.socket, data: bytes, seconds: float = 6.0) -> tuple[float, bytes]:
    """Sends `data` one byte every 50 ms; returns (seconds until the server closed, what it sent)."""
    with sock:
        sock.settimeout(0.05)
        start, received = time.monotonic(), b""
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
                chunk = sock.recv(65536)  # b"": closed by the server
                received += chunk
                if not chunk:
                    break
            except socket.timeout:
                pass
            except OSError:  # reset: closed by the server
                break
            if time.monotonic() - start > seconds:
                break
        return time.monotonic() - start, received


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_trickling_client_is_cut_off_while_good_clients_are_answered(hostile_server, part):
    """Slowloris: the headers, or the body after whole headers, one byte every 50 ms. The idle
    timeout (1 s here) ends the headers and the read timeout the body, with no answer; good
    clients are answered meanwhile, so the trickle holds no thread and blocks nothing."""
    port, _ = hostile_server
    head = request(f"Content-Length: {len(BODY)}\r\n", close=False)
    sock = socket.create_connection(("127.0.0.1", port))
    if part == "body":
        sock.sendall(head)  # whole headers: the request is in, its body trickles
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(trickle, sock, BODY if part == "body" else head + BODY)
        good = []
        while not slow.done():
            started = time.monotonic()
            good.append((good_predict(port), time.monotonic() - started))
        seconds, received = slow.result()
    assert received == b"" and 0.8 < seconds < 2.5
    assert len(good) >= 3 and all(code == 200 for (code, _), _ in good)
    assert max(latency for _, latency in good) < 1.0


def test_connections_beyond_the_cap_get_503_and_threads_stay_bounded(hostile_server):
    port, _ = hostile_server
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        time.sleep(0.3)
        assert threading.active_count() - before <= 12  # idle connections hold no thread; the pool has 12 at most
        code, body = good_predict(port)
        assert code == 503 and "too many connections" in body["error"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert good_predict(port)[0] == 200


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_good_clients_are_answered_while_a_hostile_fleet_runs(hostile_server):
    port, _ = hostile_server
    expected = good_predict(port)[1]
    rss_before, threads_before = rss_mb(), threading.active_count()
    deep = b"[" * 10000
    attacks = [
        request("Content-Length: -1\r\n", b"x" * 50_000),  # negative length and a body
        request("Content-Length: 200000000\r\n", b"x" * 1000),  # a huge claim
        request(f"Content-Length: {len(deep)}\r\n", deep),  # deep JSON
        b"GARBAGE\r\n\r\n",  # not HTTP
        request(f"Content-Length: {len(BODY)}\r\n", BODY[:5]),  # never finished (dropped after the idle timeout)
        request("Transfer-Encoding: chunked\r\n", b"ffffffff\r\nxx"),  # a chunk claimed far over the limit
    ]
    stop = threading.Event()

    def hostile(index: int) -> int:
        sent = 0
        while not stop.is_set() and sent < 15:
            try:
                exchange(port, attacks[index % len(attacks)], timeout=3)
            except OSError:
                pass
            sent += 1
        return sent

    with ThreadPoolExecutor(6) as pool:
        fleet = [pool.submit(hostile, i) for i in range(6)]
        try:
            good = []
            for _ in range(20):
                good.append(good_predict(port))
                assert threading.active_count() - threads_before <= 12 + 6
        finally:
            stop.set()
        assert sum(f.result() for f in fleet) > 0
    assert all(code == 200 and body == expected for code, body in good)
    assert rss_mb() - rss_before < 100


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port 70000: must be a port number from 0 (a free port) to 65535"),
    (["--port", "-5"], "--port -5: must be a port number from 0 (a free port) to 65535"),
    (["--grpc-port", "99999"], "--grpc-port 99999: must be a port number from 0 (a free port) to 65535"),
    (["--max-connections", "0"], "--max-connections 0: must be an integer, 1 or more"),
    (["--poll-seconds", "0"], "--poll-seconds 0: must be 0.1 or more"),
    (["--idle-timeout-s", "0"], "--idle-timeout-s 0: must be above 0"),
    (["--max-request-mb", "-1"], "--max-request-mb -1: must be above 0"),
    (["--max-request-mb", "nan"], "--max-request-mb nan: must be above 0"),
    (["--max-batch-size", "0"], "--max-batch-size 0: must be an integer, 1 or more"),
    (["--batch-timeout-ms", "-1"], "--batch-timeout-ms -1: must be 0 or more"),
    (["--host", "999.1.1.1", "--port", "0", "--no-grpc"], "--host: cannot resolve host '999.1.1.1'"),
])
def test_bad_serve_settings_are_one_line_errors_before_any_model_loads(tmp_path, capsys, flags, message):
    # tmp_path holds no exports: an error about the setting, not about the exports, came first
    assert cli.main(["serve", "--run-dir", str(tmp_path), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"kcp serve: error: {message}"


def test_ports_are_bound_before_any_model_loads(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"^--port {port}: cannot bind 127.0.0.1:{port}: Address already in use$"):
            make_server(str(tmp_path), "127.0.0.1", port)  # no exports there: the port's error came first
        with pytest.raises(UserError, match=rf"^--grpc-port {port}: cannot bind 127.0.0.1:{port}"):
            make_server(str(tmp_path), "127.0.0.1", 0, grpc_port=port)


def finish_during_stop(port: int, stop) -> tuple[tuple[int, dict], tuple[int, dict]]:
    """Sends a request's headers and a part of its body, calls `stop()` (a signal), checks that new
    connections are refused, then sends the rest: (that request's answer, an answer from before)."""
    before = good_predict(port)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request(f"Content-Length: {len(BODY)}\r\n", BODY[:10]))  # in progress from now on
        time.sleep(0.3)
        stop()
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # stopped accepting
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        sock.sendall(BODY[10:])
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return responses(b"".join(chunks))[0], before


def test_a_stop_closes_a_stalled_request_after_the_grace_not_after_the_idle_timeout(digits_run):
    """A client that sent half a body and went quiet kept the server from stopping until its idle
    timeout (30 s): aiohttp's shutdown waits without a limit when given a timeout of 0."""
    server = make_server(digits_run, "127.0.0.1", 0, allow_unvalidated=True, idle_timeout_s=60)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    port = server.server_address[1]
    try:
        good_predict(port)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request(f"Content-Length: {len(BODY)}\r\n", BODY[:10]))  # then nothing more
            time.sleep(0.3)
            started = time.monotonic()
            server.request_stop(grace=0.5)
            serving.join(10)
            stopped = time.monotonic() - started
            assert not serving.is_alive() and stopped < 3, stopped
            assert sock.recv(65536) == b""  # its connection closed, unanswered: its request never arrived
    finally:
        server.shutdown()
        server.server_close()


def test_sigterm_stops_kcp_serve_after_the_request_in_progress(digits_run):
    """A real `kcp serve` process: SIGTERM (docker, Kubernetes, systemd) lets the request in progress
    finish, prints one line and exits 143, as a death by SIGTERM would (but cleanly)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kcp import cli; sys.exit(cli.main())", "serve", "--run-dir",
         digits_run, "--port", "0", "--grpc-port", "0", "--allow-unvalidated"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        line = process.stdout.readline()  # [serve] http://127.0.0.1:PORT/v1/models/<name>, gRPC ...
        assert line.startswith("[serve] http://127.0.0.1:"), process.stderr.read() if not line else line
        port = int(re.search(r":(\d+)/v1/models", line).group(1))
        during, before = finish_during_stop(port, lambda: process.send_signal(signal.SIGTERM))
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert during == before and during[0] == 200
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == \
        "kcp serve: SIGTERM: stopped; requests in progress were given 5 s to finish"

    # a second SIGTERM while a stalled request holds the drain: out at once, 143 still (it was 130 and
    # "interrupted; ... train and tune resume", after the model calls still running had finished)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kcp import cli; sys.exit(cli.main())", "serve", "--run-dir",
         digits_run, "--port", "0", "--no-grpc", "--allow-unvalidated"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        port = int(re.search(r":(\d+)/v1/models", process.stdout.readline()).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request(f"Content-Length: {len(BODY)}\r\n", BODY[:10]))
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=60)
            assert time.monotonic() - started < 3
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == "kcp serve: SIGTERM again: stopped at once"


def test_ctrl_c_stops_kcp_serve_after_the_request_in_progress(digits_run, capsys):
    """Ctrl-C (SIGINT) in `kcp serve`, in this process: the same drain, one line, exit 130."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    finished, outcome = threading.Event(), {}

    def client():
        deadline = time.monotonic() + 60
        while not finished.is_set():  # until the server answers
            try:
                good_predict(port)
                break
            except OSError:
                time.sleep(0.1)
                if time.monotonic() > deadline:
                    break
        try:
            outcome["answers"] = finish_during_stop(port, lambda: os.kill(os.getpid(), signal.SIGINT))
        except Exception as error:  # noqa: BLE001  reported below
            outcome["error"] = error
            if not finished.is_set():
                os.kill(os.getpid(), signal.SIGINT)  # never leave the server running

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        code = cli.main(["serve", "--run-dir", digits_run, "--port", str(port), "--no-grpc", "--allow-unvalidated"])
    finally:
        finished.set()
    thread.join(30)
    assert "error" not in outcome, outcome.get("error")
    during, before = outcome["answers"]
    assert during == before and during[0] == 200
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "kcp serve: SIGINT: stopped; requests in progress were given 5 s to finish"

"""REST serving latency and throughput against calling the SavedModel in-process.

    .venv/bin/python bench/serving_latency.py [--requests 400] [--run-dir RUN]

Exports digits (or uses --run-dir's export), starts `kcp serve` as its own process on
127.0.0.1, and sends one-image predict requests (a PNG as {"b64": ...}) over keep-alive
connections from 1 and 32 concurrent clients, with server-side batching on and off.
Prints p50/p99 latency and requests/s, and the in-process signature call for comparison.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_of_first_test_image(run_dir: str) -> bytes:
    import tensorflow as tf

    from kcp.core import contract as contract_lib

    from kcp.core import examples as example_lib

    contract = contract_lib.read_contract(run_dir)
    images, _, _ = next(iter(example_lib.read_split(contract, contract_lib.data_dir(run_dir), "test", 1)))
    return tf.io.encode_png(images[0]).numpy()


def in_process(run_dir: str, png: bytes, count: int) -> list[float]:
    import tensorflow as tf

    serve = tf.saved_model.load(os.path.join(run_dir, "export", "model", "1")).signatures["serving_default"]
    inputs = tf.constant([png])
    for _ in range(20):
        serve(image_bytes=inputs)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        serve(image_bytes=inputs)["probabilities"].numpy()
        latencies.append(time.perf_counter() - started)
    return latencies


def load(port: int, body: bytes, clients: int, per_client: int) -> tuple[list[float], float]:
    latencies, lock = [], threading.Lock()

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for _ in range(per_client):
            started = time.perf_counter()
            connection.request("POST", "/v1/models/model:predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()
            response.read()
            mine.append(time.perf_counter() - started)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration")
    parser.add_argument("--run-dir")
    args = parser.parse_args()
    kcp = os.path.join(os.path.dirname(sys.executable), "kcp")
    run_dir = args.run_dir
    if not run_dir:
        run_dir = tempfile.mkdtemp(prefix="kcp-serve-bench-")
        subprocess.run([kcp, "run", "--run-dir", run_dir, "--set", "train.epochs=5", "--", "--direct_running_mode=in_memory"],
                       check=True, capture_output=True)
    png = png_of_first_test_image(run_dir)
    body = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode()
    local = in_process(run_dir, png, args.requests)
    rows = [("in-process signature call", 1, local, sum(local))]
    for batching in (True, False):
        port = free_port()
        command = [kcp, "serve", "--run-dir", run_dir, "--port", str(port)] + ([] if batching else ["--no-batching"])
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            load(port, body, 4, 10)  # warm-up: tracing, connections
            for clients in (1, 32):
                latencies, seconds = load(port, body, clients, max(1, args.requests // clients))
                rows.append((f"REST, batching {'on' if batching else 'off'}", clients, latencies, seconds))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("\n| configuration | clients | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|")
    for name, clients, latencies, seconds in rows:
        print(f"| {name} | {clients} | {percentile(latencies, 0.5) * 1000:.2f} | {percentile(latencies, 0.99) * 1000:.2f} "
              f"| {len(latencies) / seconds:,.0f} |")
    print(f"\np50 overhead at 1 client (batching on): "
          f"{(percentile(rows[1][2], 0.5) - statistics.median(local)) * 1000:.2f} ms")


if __name__ == "__main__":
    main()

"""REST and gRPC serving latency and throughput against calling the SavedModel in-process.

    .venv/bin/python bench/serving_latency.py [--requests 400] [--run-dir RUN] [--idle 1000]

Exports digits (or uses --run-dir's export), starts `kcp serve --allow-unvalidated` as its
own process on 127.0.0.1, and sends one-image predict requests (a PNG as {"b64": ...} over
keep-alive REST connections; the same PNG as a string tensor through the official gRPC
PredictionServiceStub, one channel per client) from 1 and 32 concurrent clients, with
server-side batching on and off. Prints p50/p99 latency and requests/s, the in-process
signature call for comparison, and the server's RSS with `--idle` idle connections open
(those beyond --max-connections are answered 503 and closed).
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

    return latencies, run_clients(client, clients)


def run_clients(client, clients: int) -> float:
    """Runs `client` in `clients` threads at once; returns the wall seconds until all are done."""
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def grpc_load(port: int, png: bytes, clients: int, per_client: int) -> tuple[list[float], float]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "model"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([png], dtype=tf.string))
    latencies, lock = [], threading.Lock()

    def client():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            mine = []
            for _ in range(per_client):
                started = time.perf_counter()
                stub.Predict(request, timeout=60)
                mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    return latencies, run_clients(client, clients)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def idle_rss(port: int, pid: int, count: int) -> tuple[float, float]:
    """The server's RSS before and with `count` idle connections open."""
    before = rss_mb(pid)
    sockets = []
    try:
        for _ in range(count):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(1.0)
        return before, rss_mb(pid)
    finally:
        for sock in sockets:
            sock.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration")
    parser.add_argument("--run-dir")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kcp = [sys.executable, "-m", "kcp.cli"]  # this checkout's kcp, run from its root
    run_dir = args.run_dir
    if not run_dir:
        run_dir = tempfile.mkdtemp(prefix="kcp-serve-bench-")
        subprocess.run([*kcp, "run", "--run-dir", run_dir, "--set", "train.epochs=5", "--", "--direct_running_mode=in_memory"],
                       check=True, capture_output=True, cwd=root)
    png = png_of_first_test_image(run_dir)
    body = json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode()
    local = in_process(run_dir, png, args.requests)
    rows = [("in-process signature call", 1, local, sum(local))]
    idle = None
    for batching in (True, False):
        port, grpc_port = free_port(), free_port()
        command = [*kcp, "serve", "--run-dir", run_dir, "--port", str(port), "--grpc-port", str(grpc_port),
                   "--allow-unvalidated"] + ([] if batching else ["--no-batching"])
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
        try:
            for _ in range(300):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            load(port, body, 4, 10)  # warm-up: tracing, connections
            grpc_load(grpc_port, png, 4, 10)
            for clients in (1, 32):
                latencies, seconds = load(port, body, clients, max(1, args.requests // clients))
                rows.append((f"REST, batching {'on' if batching else 'off'}", clients, latencies, seconds))
                latencies, seconds = grpc_load(grpc_port, png, clients, max(1, args.requests // clients))
                rows.append((f"gRPC, batching {'on' if batching else 'off'}", clients, latencies, seconds))
            if batching and args.idle:
                idle = idle_rss(port, server.pid, args.idle)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("\n| configuration | clients | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|")
    for name, clients, latencies, seconds in rows:
        print(f"| {name} | {clients} | {percentile(latencies, 0.5) * 1000:.2f} | {percentile(latencies, 0.99) * 1000:.2f} "
              f"| {len(latencies) / seconds:,.0f} |")
    by_name = {(name, clients): (latencies, seconds) for name, clients, latencies, seconds in rows}
    local_p50 = statistics.median(local)
    for protocol in ("REST", "gRPC"):
        p50 = percentile(by_name[(f"{protocol}, batching on", 1)][0], 0.5)
        on, off = (len(by_name[(f"{protocol}, batching {s}", 32)][0]) / by_name[(f"{protocol}, batching {s}", 32)][1]
                   for s in ("on", "off"))
        print(f"{protocol}: p50 overhead at 1 client {(p50 - local_p50) * 1000:.2f} ms; "
              f"32 clients, batching on / off throughput {on / off:.2f}x")
    if idle:
        print(f"server RSS {idle[0]:.0f} MB idle, {idle[1]:.0f} MB with {args.idle} idle connections open")

if __name__ == "__main__":
    main()

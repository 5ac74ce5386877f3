"""REST and gRPC serving latency and throughput against calling the SavedModel in-process.

    .venv/bin/python bench/serving_latency.py [--requests 400] [--run-dir RUN] [--idle 1000]
    .venv/bin/python bench/serving_latency.py --model resnet [--resnet-depth 20]
    .venv/bin/python bench/serving_latency.py --model rnn

Trains and exports the digits CNN (or, with `--model resnet`, a CIFAR-style ResNet on a
generated folder of 32x32 colour PNGs, where the model call rather than the Python layer
dominates; with `--model rnn`, the default bidirectional LSTM on one-line texts from the
files on this machine, a model whose call costs about the same for 1 or 32 inputs; or uses
--run-dir's export), starts `kcp serve --allow-unvalidated` as its
own process on 127.0.0.1, and sends one-image predict requests (a PNG as {"b64": ...} over
keep-alive REST connections; the same PNG as a string tensor through the official gRPC
PredictionServiceStub, one channel per client) from 1 and 32 concurrent clients, with
server-side batching on and off. Prints p50/p99 latency and requests/s, the in-process
signature call for comparison, and the server's RSS and threads with `--idle` idle
connections open (those beyond --max-connections are answered 503 and closed). A text model
gets one line, as a JSON string over REST and a string tensor over gRPC.
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


def colour_images(root: str, per_class: int = 60) -> None:
    """3 classes of 32x32 colour PNGs (the class is the dominant channel) under root/classN/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(3 * per_class):
        label = index % 3
        image = rng.integers(0, 80, (32, 32, 3))
        image[..., label] += 150
        os.makedirs(os.path.join(root, f"class{label}"), exist_ok=True)
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(root, f"class{label}", f"{index:04d}.png"))


TEXT_LINE = "def forward(self, inputs): return self.dense(self.dropout(inputs))  # one line of code"


def train_run(kcp: list[str], root: str, model: str, resnet_depth: int) -> str:
    """A fresh run directory with an export of `model` (cnn: digits; resnet: 32x32 colour images;
    rnn: one-line texts of 6 kinds)."""
    run_dir = tempfile.mkdtemp(prefix=f"kcp-serve-bench-{model}-")
    if model == "cnn":
        options = ["--set", "train.epochs=5"]
    elif model == "rnn":
        from modality_zoo import make_text

        options = ["--source", make_text(os.path.join(run_dir, "lines.jsonl")), "--model", "rnn",
                   "--set", "train.epochs=1"]
    else:
        images = os.path.join(run_dir, "images")
        colour_images(images)
        options = ["--source", f"folder:{images}", "--model", "resnet", "--set", f"model.depth={resnet_depth}",
                   "--set", "train.epochs=1"]
    subprocess.run([*kcp, "run", "--run-dir", run_dir, *options, "--", "--direct_running_mode=in_memory"],
                   check=True, capture_output=True, cwd=root)
    return run_dir


def request_input(run_dir: str) -> tuple[str, bytes, object]:
    """(the serving input's name, one input as bytes, the same as a JSON instance): the first
    test image as a PNG, or TEXT_LINE for a text model."""
    import tensorflow as tf

    from kcp.core import contract as contract_lib

    from kcp.core import examples as example_lib

    contract = contract_lib.read_contract(run_dir)
    if contract.modality == "text":
        return contract.input_feature, TEXT_LINE.encode(), TEXT_LINE
    images, _, _ = next(iter(example_lib.read_split(contract, contract_lib.data_dir(run_dir), "test", 1)))
    png = tf.io.encode_png(images[0]).numpy()
    return "image_bytes", png, {"b64": base64.b64encode(png).decode()}


def in_process(run_dir: str, name: str, value: bytes, count: int, batch: int = 1) -> list[float]:
    """Seconds per in-process serving_default call on `batch` copies of the input."""
    import tensorflow as tf

    serve = tf.saved_model.load(os.path.join(run_dir, "export", "model", "1")).signatures["serving_default"]
    inputs = {name: tf.constant([value] * batch)}
    for _ in range(20):
        serve(**inputs)
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        serve(**inputs)["probabilities"].numpy()
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


def grpc_load(port: int, name: str, value: bytes, clients: int, per_client: int) -> tuple[list[float], float]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "model"
    request.inputs[name].CopyFrom(tf.make_tensor_proto([value], dtype=tf.string))
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


def process_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of process `pid`."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def idle_rss(port: int, pid: int, count: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """The server's (RSS, threads) before and with `count` idle connections open."""
    before = process_status(pid)
    sockets = []
    try:
        for _ in range(count):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(1.0)
        return before, process_status(pid)
    finally:
        for sock in sockets:
            sock.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per configuration")
    parser.add_argument("--run-dir", help="serve this run's export instead of training one")
    parser.add_argument("--model", choices=("cnn", "resnet", "rnn"), default="cnn",
                        help="what to train when no --run-dir: the digits CNN, a ResNet on 32x32 colour images "
                             "or the text RNN")
    parser.add_argument("--resnet-depth", type=int, default=20, help="with --model resnet: 20, 32, 44, 56, ...")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections for the memory figure")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kcp = [sys.executable, "-m", "kcp.cli"]  # this checkout's kcp, run from its root
    run_dir = args.run_dir or train_run(kcp, root, args.model, args.resnet_depth)
    print(f"run directory: {run_dir}")
    name, value, instance = request_input(run_dir)
    body = json.dumps({"instances": [instance]}).encode()
    local = in_process(run_dir, name, value, args.requests)
    local_batch = in_process(run_dir, name, value, max(10, args.requests // 32), batch=32)  # batching's most
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
            grpc_load(grpc_port, name, value, 4, 10)
            for clients in (1, 32):
                latencies, seconds = load(port, body, clients, max(1, args.requests // clients))
                rows.append((f"REST, batching {'on' if batching else 'off'}", clients, latencies, seconds))
                latencies, seconds = grpc_load(grpc_port, name, value, clients, max(1, args.requests // clients))
                rows.append((f"gRPC, batching {'on' if batching else 'off'}", clients, latencies, seconds))
            if batching and args.idle:
                idle = idle_rss(port, server.pid, args.idle)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print("\n| configuration | clients | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|")
    for name, clients, latencies, seconds in rows:
        print(f"| {name} | {clients} | {percentile(latencies, 0.5) * 1000:.2f} "
              f"| {percentile(latencies, 0.99) * 1000:.2f} "
              f"| {len(latencies) / seconds:,.0f} |")
    by_name = {(name, clients): (latencies, seconds) for name, clients, latencies, seconds in rows}
    local_p50 = statistics.median(local)
    for protocol in ("REST", "gRPC"):
        p50 = percentile(by_name[(f"{protocol}, batching on", 1)][0], 0.5)
        on, off = (len(by_name[(f"{protocol}, batching {s}", 32)][0]) / by_name[(f"{protocol}, batching {s}", 32)][1]
                   for s in ("on", "off"))
        print(f"{protocol}: p50 overhead at 1 client {(p50 - local_p50) * 1000:.2f} ms; "
              f"32 clients, batching on / off throughput {on / off:.2f}x")
    batch_p50 = statistics.median(local_batch)
    print(f"in-process call on a batch of 32: p50 {batch_p50 * 1000:.2f} ms, {32 / batch_p50:,.0f} inputs/s, "
          f"{32 * local_p50 / batch_p50:.1f}x the single call's inputs/s (the model's own batching gain)")
    if idle:
        (rss, threads), (rss_open, threads_open) = idle
        print(f"server RSS {rss:.0f} MB and {threads} threads idle; {rss_open:.0f} MB and {threads_open} threads "
              f"with {args.idle} idle connections open")

if __name__ == "__main__":
    main()

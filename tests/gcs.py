"""A local GCS emulator (gcp-storage-emulator, the real JSON API) for tests, on 127.0.0.1.

The real google-cloud-storage client and Beam's GCS filesystem talk to it through
STORAGE_EMULATOR_HOST. A dummy `authorized_user` credentials file keeps each process from
spending ~30 s looking for Google credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GcsEmulator:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.port = free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.process = None

    def environment(self) -> dict:
        credentials = os.path.join(self.workdir, "credentials.json")
        with open(credentials, "w") as handle:
            json.dump({"type": "authorized_user", "client_id": "test", "client_secret": "test",
                       "refresh_token": "test"}, handle)
        return {"STORAGE_EMULATOR_HOST": self.host, "GOOGLE_APPLICATION_CREDENTIALS": credentials,
                "GOOGLE_CLOUD_PROJECT": "test-project", "CLOUDSDK_CORE_PROJECT": "test-project"}

    def start(self) -> "GcsEmulator":
        executable = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable)) or "gcp-storage-emulator"
        data = os.path.join(self.workdir, "gcs-data")
        os.makedirs(data, exist_ok=True)
        self.process = subprocess.Popen([executable, "-d", data, "start", "--host", "127.0.0.1", "--port",
                                         str(self.port), "--default-bucket", "kcp-test", "--quiet"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("gcp-storage-emulator exited at start")
                time.sleep(0.1)
        raise RuntimeError("gcp-storage-emulator did not open its port within 30 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

"""A local GCS emulator (gcp-storage-emulator, the real JSON API) for tests, on 127.0.0.1.

The real google-cloud-storage client and Beam's GCS filesystem talk to it through
STORAGE_EMULATOR_HOST. A dummy `authorized_user` credentials file keeps each process from
spending ~30 s looking for Google credentials.
"""

from __future__ import annotations

import json
import os
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
        # The emulator's own command line, wrapped to enforce GCS's generation preconditions
        # (tests/gcs_emulator_main.py). In memory: on disk, the emulator stores object `a/` as a
        # file `a`, and then cannot store `a/b` (FileExistsError); TensorFlow writes such folder markers.
        launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_main.py")
        self.process = subprocess.Popen([sys.executable, launcher, "start", "--in-memory", "--host", "127.0.0.1",
                                         "--port", str(self.port), "--default-bucket", "kcp-test", "--quiet"],
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


GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "expect", "content-length"}


def make_test_certificates(workdir: str, hosts=GOOGLE_HOSTS) -> tuple[str, str, str]:
    """A throw-away CA and a certificate for `hosts` signed by it: (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kcp test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(workdir, name) for name in ("ca.pem", "cert.pem", "key.pem")]
    pem = serialization.Encoding.PEM
    contents = [ca.public_bytes(pem), leaf.public_bytes(pem),
                key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())]
    for path, content in zip(paths, contents):
        with open(path, "wb") as handle:
            handle.write(content)
    return tuple(paths)


class GoogleApisProxy:
    """An HTTPS proxy on 127.0.0.1 that plays Google's API hosts, for TensorFlow's own GCS filesystem.

    TensorFlow 2.21's gs:// support has https://www.googleapis.com and
    https://storage.googleapis.com built in and ignores STORAGE_EMULATOR_HOST. Its libcurl
    honours HTTPS_PROXY and CURL_CA_BUNDLE, so this proxy accepts CONNECT for those hosts,
    terminates TLS with a certificate from a throw-away CA, and forwards each request to the
    emulator: request bodies are de-chunked (curl streams uploads chunked), the Host header
    is kept so the emulator builds its URLs for the Google host, and the resumable-upload
    `Location` it returns is turned back into https. Token requests (Beam's and
    google-auth's, from `authorized_user` credentials) get a dummy token; TensorFlow itself
    takes GOOGLE_AUTH_TOKEN_FOR_TESTING. Every request is recorded in `self.requests`, so a
    test can prove the traffic went through TensorFlow's client and not another one.
    """

    def __init__(self, workdir: str, emulator_port: int):
        self.workdir = workdir
        self.emulator_port = emulator_port
        self.requests: list[tuple[str, str, str]] = []  # (host, method, path)
        self.server = None

    def environment(self) -> dict:
        proxy = f"http://127.0.0.1:{self.port}"
        return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost", "CURL_CA_BUNDLE": self.ca, "REQUESTS_CA_BUNDLE": self.ca,
                "NO_GCE_CHECK": "true",
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "kcp-test-token"}

    def start(self) -> "GoogleApisProxy":
        import socketserver
        import ssl
        import threading

        self.ca, cert, key = make_test_certificates(self.workdir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline(65536).decode("latin-1").split()
                read_headers(self.rfile)  # the CONNECT request's own headers are not needed
                if len(line) != 3 or line[0] != "CONNECT" or line[1].split(":")[0] not in GOOGLE_HOSTS:
                    self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.wfile.flush()
                with context.wrap_socket(self.connection, server_side=True) as tls:
                    proxy.serve_tunnel(tls, line[1].split(":")[0])

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def serve_tunnel(self, tls, host: str) -> None:
        import http.client

        reader, writer = tls.makefile("rb"), tls.makefile("wb")
        upstream = http.client.HTTPConnection("127.0.0.1", self.emulator_port, timeout=60)
        while True:
            line = reader.readline(65536).decode("latin-1").split()
            if len(line) != 3:
                return
            method, path, _ = line
            headers = read_headers(reader)
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                writer.flush()
            body = read_body(reader, headers)
            self.requests.append((host, method, path))
            if host == "oauth2.googleapis.com" or path.startswith("/oauth2/"):
                status, reason, reply_headers, upstream_length = 200, "OK", [("Content-Type", "application/json")], None
                reply = json.dumps({"access_token": "kcp-test-token", "expires_in": 3600,
                                    "token_type": "Bearer"}).encode()
            else:
                forward = {k: v for k, v in headers.items() if k not in HOP_BY_HOP}
                forward["host"] = host
                if method == "POST" and not body and "uploadType=media" in path:
                    path, body, forward["content-type"] = empty_media_upload_as_multipart(path)
                upstream.request(method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None,
                                 headers=forward)
                response = upstream.getresponse()
                reply = response.read()
                status, reason = response.status, response.reason
                upstream_length = response.getheader("content-length")
                reply_headers = []
                for name, value in response.getheaders():
                    if name.lower() in HOP_BY_HOP:
                        continue
                    if name.lower() == "location":
                        value = value.replace(f"http://{host}", f"https://{host}", 1)
                    reply_headers.append((name, value))
            out = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in reply_headers]
            length = len(reply) if method != "HEAD" else (upstream_length or 0)
            out.append(f"Content-Length: {length}")
            writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            if method != "HEAD":
                writer.write(reply)
            writer.flush()
            if headers.get("connection", "").lower() == "close":
                return

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def empty_media_upload_as_multipart(path: str) -> tuple[str, bytes, str]:
    """The same empty upload as a multipart one: gcp-storage-emulator 2026.7.19 fails on an
    empty `uploadType=media` body (`len(None)` in `_media_upload`), which real GCS accepts
    and TensorFlow sends for every folder marker it creates."""
    import urllib.parse

    name = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["name"][0]
    body = (b"--kcp\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n" + json.dumps({"name": name}).encode()
            + b"\r\n--kcp\r\nContent-Type: application/octet-stream\r\n\r\n\r\n--kcp--\r\n")
    return path.replace("uploadType=media", "uploadType=multipart"), body, "multipart/related; boundary=kcp"


def read_headers(reader) -> dict:
    headers = {}
    while True:
        line = reader.readline(65536).decode("latin-1")
        if line in ("\r\n", "\n", ""):
            return headers
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()


def read_body(reader, headers: dict) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(reader.readline(65536).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                read_headers(reader)  # trailers, then the blank line
                return b"".join(parts)
            parts.append(reader.read(size))
            reader.readline(65536)
    return reader.read(int(headers.get("content-length", 0) or 0))

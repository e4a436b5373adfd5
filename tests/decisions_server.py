"""Helpers for the review app's tests: a real predict run with every review reason, and a real
`kmnist-batch review` process on a free port, talked to over HTTP."""

from __future__ import annotations

import http.client
import json
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib_fontja
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from batch_infer.job import PredictOptions, run_predict
from kmnist_core.model_dir import load_model
from tests.crop_tree import plain_tree, save

CLI = str(Path(sys.executable).parent / "kmnist-batch")
FONT = Path(matplotlib_fontja.__file__).parent / "fonts" / "ipaexg.ttf"
URL = re.compile(r"open (https?://[^/\s]+)/\?token=(\S+)")
LOW_CONFIDENCE = 12  # crops of the run below its review threshold


def make_run(root: Path, images: np.ndarray, n: int = 150) -> Path:
    """A finished predict run (in-process, no Ray) over `n` real crops, two blank crops, two broken
    files and three kanji the model does not know; several shards. Returns OUT."""
    plain_tree(root / "in", images, n, per_folder=50)
    # "0-odd" is listed first, so its broken files open the first shard, whatever the temp path's hashes
    # make of the shard boundaries: a --retry-errors rerun always moves their rows (test_decisions_app).
    for i in range(2):
        save(Image.new("L", (28, 28), 0), root / "in" / "0-odd" / f"blank-{i}.png")
    (root / "in" / "0-odd" / "empty.png").write_bytes(b"")
    (root / "in" / "0-odd" / "fake.jpg").write_bytes(b"not a picture")
    for i, char in enumerate("漢鬱議"):
        img = Image.new("L", (64, 64), 235)
        ImageDraw.Draw(img).text((32, 32), char, fill=20, anchor="mm", font=ImageFont.truetype(str(FONT), 52))
        save(img, root / "in" / "0-odd" / f"kanji-{i}.png")
    # The default model was trained on all of kmnist-dev, so at its own threshold it is sure of nearly every
    # one of these crops; the run's --review-below sends the LOW_CONFIDENCE least confident to review
    # instead, whatever model is the default.
    confidence = np.sort(load_model("default", precision="fp32").probabilities(images[:n]).max(1))
    out = root / "out"
    run_predict([root / "in"], out, PredictOptions(precision="fp32", rows_per_shard=20, executor="local",
                                                   review_below=float(confidence[LOW_CONFIDENCE])))
    return out


class Server:
    """`kmnist-batch review OUT --port 0 ...` in its own process; `base` and `token` from its stdout, and
    the cookie that `GET /?token=` sets, which every request then carries. Over HTTPS, `cafile` is the
    certificate to trust."""

    def __init__(self, out: Path | str, *args: str, timeout: float = 90.0, cafile: Path | None = None):
        self.proc = subprocess.Popen([CLI, "review", str(out), "--port", "0", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        found = threading.Event()

        def read_stdout() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if URL.search(line):
                    found.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"review server did not start: {''.join(self.lines)}{''.join(self.errors)}")
        self.base, self.token = URL.search("".join(self.lines)).groups()
        self.scheme, authority = self.base.split("://")
        self.host, self.port = authority.rsplit(":", 1)
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None
        try:
            status, headers, _ = self.request("GET", f"/?token={self.token}", token=False)
            assert status == 303, status
        except BaseException:  # no server left behind by a start that failed
            self.kill()
            raise
        self.cookie = headers["set-cookie"].split(";")[0]

    @property
    def url(self) -> str:
        return f"{self.base}/?token={self.token}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: bool = True) -> tuple[int, dict, bytes]:
        """One request on a fresh connection, with the token's cookie unless `token` is False; `path` is
        sent as is (no normalisation of `..`)."""
        headers = {**({"Cookie": self.cookie} if token else {}), **(headers or {})}
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, int(self.port), timeout=30, context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, int(self.port), timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def get_json(self, path: str) -> dict:
        status, _, body = self.request("GET", path)
        assert status == 200, (status, body)
        return json.loads(body)

    def post(self, decisions: list[dict], token: bool = True) -> tuple[int, dict]:
        status, _, body = self.request("POST", "/api/decisions", json.dumps({"decisions": decisions}).encode(),
                                       {"Content-Type": "application/json"}, token=token)
        return status, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}

    def all_tiles(self, tab: str, size: int = 7) -> list[dict]:
        """Every tile of a tab, page by page."""
        first = self.get_json(f"/api/queue?tab={tab}&page=0&size={size}")
        tiles = list(first["tiles"])
        for page in range(1, first["pages"]):
            tiles += self.get_json(f"/api/queue?tab={tab}&page={page}&size={size}")["tiles"]
        return tiles

    def stop(self) -> int:
        """Ctrl-C, as a user stops it; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key, as PEM files in `folder` (cryptography comes
    with the test extras, through moto)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file

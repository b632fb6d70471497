"""Shared fixtures. Tests run on CPU; Ray tests share one local 2-CPU instance per module that asks."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from loopback import free_port  # noqa: E402  (tests import it from here)

# A local ray.init() turns token auth on and writes ~/.ray/auth_token (Ray >= 2.59); tests opt out so
# their behaviour does not depend on that file. Trials keep the working directory (relative paths).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
             object_store_memory=200 * 1024 ** 2)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch thread for the test (batches in tests are tiny: on a busy 2-core box, 2 intra-op
    threads made them 10x slower); the previous count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's server mode) on 127.0.0.1 for the session, and the standard AWS
    variables pointing at it (set before any Ray starts, so Ray's workers inherit them)."""
    import subprocess
    import sys
    import time
    import urllib.request
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start")
            time.sleep(0.05)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server, request):
    """A new bucket on the test S3 server: its s3:// URI."""
    from pyarrow import fs
    name = "gt-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"


def s3(uri: str):
    """(pyarrow filesystem, path) of an s3:// URI."""
    from pyarrow import fs
    return fs.FileSystem.from_uri(uri)


def s3_files(uri: str) -> list[str]:
    """Every file under an s3:// URI, relative to it ([] when there is none)."""
    from pyarrow import fs
    remote, root = s3(uri)
    try:
        return [i.path[len(root):].lstrip("/") for i in remote.get_file_info(fs.FileSelector(root, recursive=True))]
    except FileNotFoundError:
        return []


def s3_read(uri: str, rel: str) -> str:
    """The text of the file `rel` under an s3:// URI."""
    remote, root = s3(uri)
    with remote.open_input_stream(f"{root}/{rel}") as f:
        return f.read().decode()


def trial_params(run_dir):
    """(trial folder, params) for each trial of a running search whose params.json is written: Ray may be
    writing one at the moment a test polls (read empty, it is skipped until the next poll)."""
    for path in sorted(Path(run_dir).glob("trial_*/params.json")):
        try:
            yield path.parent, json.loads(path.read_text())
        except (OSError, ValueError):
            continue

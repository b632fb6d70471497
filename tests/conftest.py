"""Shared fixtures. Tests run on CPU; Ray tests share one local 2-CPU instance per module that asks."""
import os

import pytest
import torch

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

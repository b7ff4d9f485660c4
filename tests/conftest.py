"""Test harness: the real ComfyUI host, booted headless once per session, and the real server on demand.

Pure-core tests need none of it. Host tests use the `host` fixture (one in-process ComfyUI with the pack
loaded from custom_nodes/z2i); HTTP tests use `server` (main.py on a free loopback port, stopped at the end).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One fixed intra-op thread count for the whole run, in this process and in the servers it starts
# (OMP_NUM_THREADS is inherited): CPU kernels split work into per-thread blocks whose partial sums are added in a
# fixed order for a given thread count, so with it fixed every rerun is bit-for-bit repeatable however busy the
# machine is (measured: docs/DEVELOPING.md, "Checked under load"). Z2I_TEST_THREADS overrides it.
THREADS = int(os.environ.get("Z2I_TEST_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
import torch  # noqa: E402

torch.set_num_threads(THREADS)

REPO = Path(__file__).resolve().parents[1]
_pythonpath = REPO / ".host" / "pythonpath"
if str(_pythonpath) not in sys.path and (_pythonpath / "z2i").exists():
    sys.path.insert(0, str(_pythonpath))

from z2i.tests.helpers import ComfyServer  # noqa: E402

CHECKPOINTS = {"sd15": "z2i-tiny-sd15.safetensors", "sd2v": "z2i-tiny-sd2v.safetensors",
               "sdxl": "z2i-tiny-sdxl.safetensors"}


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    from z2i.headless.host import Host, HostMissing
    try:
        return Host.get(output_dir=tmp_path_factory.mktemp("comfy_output"))
    except HostMissing as e:
        pytest.exit(str(e), returncode=3)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from z2i.headless.host import find_host
    srv = ComfyServer(find_host(), tmp_path_factory.mktemp("server_output"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def checkpoints():
    return dict(CHECKPOINTS)


@pytest.fixture
def float64():
    """Closed-form comparisons in double precision; restored so host tests in the session are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

"""What several test files share: `fake_gpu`, CUDA rehearsed on the CPU."""
import importlib.util
import json
import os

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
FAKE_GPU_FOLDER = os.path.join(TESTS, "fake_gpu")
spec = importlib.util.spec_from_file_location("fake_gpu", os.path.join(FAKE_GPU_FOLDER, "sitecustomize.py"))
fake_gpu_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fake_gpu_site)


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(**gpu): torch reports that GPU (the arguments of tests/fake_gpu/sitecustomize.py's pretend(): count,
    name, capability, total_gib, free_gib) in this test's process, until the test ends. Returns the environment for
    the commands the test runs, which see it too: each runs on the CPU until its first real CUDA call, which fails
    with the driver's error (a real GPU, if there is one, is hidden from them)."""
    def pretend(**gpu):
        fake_gpu_site.pretend(monkeypatch.setattr, **gpu)
        python_path = os.pathsep.join(filter(None, [FAKE_GPU_FOLDER, os.environ.get("PYTHONPATH")]))
        return dict(os.environ, FAKE_GPU=json.dumps(gpu), PYTHONPATH=python_path, CUDA_VISIBLE_DEVICES="",
                    OMP_NUM_THREADS="1")
    return pretend

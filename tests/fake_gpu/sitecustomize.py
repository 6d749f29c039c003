"""
A CUDA GPU that is not there: torch reports one, so that a command runs on the CPU until its first real CUDA call,
which needs the driver and fails with the driver's error. Everything before that call is what a GPU user runs first,
and a test can check that none of it fails.

Python imports this file at start-up when its folder is on PYTHONPATH (as `sitecustomize`), and pretends when
FAKE_GPU holds the GPU as JSON. tests/conftest.py's fixture `fake_gpu` sets both for the commands a test runs, and
calls pretend() for the test's own process. What is faked is what the project asks of a GPU before it uses one:

    torch.cuda.is_available, device_count        -> True, count
    torch.cuda.get_device_properties             -> name, capability (major, minor), total memory; so also
                                                    get_device_name and get_device_capability
    torch.cuda.mem_get_info                      -> (free, total) bytes
    torch.cuda.set_device, current_device        -> the index is kept, and set_device prints one line to stderr

A new CUDA line that asks something else of the GPU before its first use fails on the driver in the tests that run
the user's commands (tests/test_fake_gpu.py): add the answer here.
"""
import json
import os
import sys
import types


def pretend(patch, count=1, name="NVIDIA A100-SXM4-80GB", capability=(8, 0), total_gib=80.0, free_gib=79.0):
    """Make torch.cuda report `count` such GPUs; patch(module, name, value) sets each attribute (setattr, or pytest's
    monkeypatch.setattr, which undoes it after the test)."""
    import torch
    GiB = 2 ** 30
    properties = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                       total_memory=int(total_gib * GiB), multi_processor_count=108)
    current = [0]  # the index set_device was given last, as the driver would keep it

    def index(device):
        if device is None:
            return current[0]
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return current[0] if device.index is None else device.index

    def get_device_properties(device=None):
        if not 0 <= index(device) < count:
            raise AssertionError("Invalid device id")  # torch's words
        return properties

    def set_device(device_index):  # torch.cuda.set_device checks the device, then calls this with its index
        current[0] = device_index
        print(f"fake GPU: torch.cuda.set_device({device_index})", file=sys.stderr, flush=True)

    patch(torch.cuda, "is_available", lambda: True)
    patch(torch.cuda, "device_count", lambda: count)
    patch(torch.cuda, "current_device", lambda: current[0])
    patch(torch.cuda, "get_device_properties", get_device_properties)
    patch(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GiB), int(total_gib * GiB)))
    patch(torch._C, "_cuda_setDevice", set_device)


if "FAKE_GPU" in os.environ:
    pretend(setattr, **json.loads(os.environ["FAKE_GPU"]))

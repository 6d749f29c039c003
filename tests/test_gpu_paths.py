"""The faults of the CUDA paths (issues 24 and 30), pinned on the CPU: stop signals with loader workers save (under
Python 3.14's forkserver too), a failure on one rank ends a torchrun job, train.sh's torchrun run outlives its
terminal and has time to save, a run may change precision or device between resumes, a resume keeps no copy of its
checkpoint, a stop saves before it samples, and train.sh refuses a machine without a GPU. (--device cuda under
torchrun: tests/test_util.py::test_pick_device_gives_cuda_an_index; one GPU's commands: tests/test_fake_gpu.py.)"""
import gc
import glob
import inspect
import os
import pty
import signal
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
import torch
from torch.distributed import run as torchrun_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
import util  # noqa: E402
from gpu_check import kill_tree  # noqa: E402
from test_train import TINY, alive, run, wait_until, write_images  # noqa: E402

ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
RUN_ON = ["--num_workers", "2", "--max_steps", "100000", "--save_every", "100000", "--sample_every", "100000",
          "--precision", "fp32", "--device", "cpu"]  # trains until stopped, never saving or sampling on its own


@pytest.fixture
def images(tmp_path):
    return write_images(str(tmp_path / "images"), 12)


def wait_for_log_rows(out, rows, process, seconds=120):
    """Polls OUT/log.csv until it has `rows` rows after its header: the run is training."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        path = out / "log.csv"
        if path.exists() and len(path.read_text().splitlines()) > rows:
            return
        time.sleep(0.1)
    pytest.fail(f"the run did not log {rows} steps in {seconds} s (exit code {process.poll()})")


def wait_or_kill(process, seconds):
    """The child's output once it exits, within `seconds`; else it and every process it started are killed (ranks
    in sessions of their own too, which would hold the output pipe open) and the test fails."""
    try:
        return "".join(stream or "" for stream in process.communicate(timeout=seconds))
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output = "".join(stream or "" for stream in process.communicate())
        pytest.fail(f"still running {seconds} s after the stop signal (it hangs); the end of its output:\n"
                    f"{output[-1500:]}")


def step_reached(output):
    """N of rank 0's last line, "stopped at step N (...)"."""
    return int(output.split("stopped at step ")[-1].split()[0])


# -- stop signals with DataLoader workers ----------------------------------------------------------------------


def forkserver_train_py(tmp_path):
    """A script that runs train.py with Python 3.14's default start method on Linux, forkserver, as Python's default:
    the server it starts sits in the rank's process group."""
    script = tmp_path / "train_forkserver.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, runpy, sys
        multiprocessing.set_start_method("forkserver")
        sys.argv[0] = {os.path.join(ROOT, "train.py")!r}
        sys.path.insert(0, {ROOT!r})
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    return str(script)


@pytest.mark.parametrize("signum, start_method", [(signal.SIGTERM, "default"), (signal.SIGHUP, "default"),
                                                  (signal.SIGTERM, "forkserver")],
                         ids=["SIGTERM", "SIGHUP", "SIGTERM-forkserver"])
def test_torchrun_stopped_with_loader_workers_saves_and_resumes(images, tmp_path, signum, start_method):
    """torchrun forwards SIGTERM (a restart, a reclaimed machine) and SIGHUP (a closed terminal) to each rank's whole
    process group, its loader workers too: they must not die of it, so that the ranks stop, save and exit before
    torchrun's grace runs out (then it kills them). With forkserver as Python's default (3.14 on), the workers must
    still not depend on a process in that group. After SIGTERM, the run resumes under torchrun too."""
    out, logs = tmp_path / "run", tmp_path / "rank_logs"
    script = forkserver_train_py(tmp_path) if start_method == "forkserver" else "train.py"
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*two_ranks, "--log-dir", str(logs), "--redirects", "3", script, "--data_dir", images, "--out_dir",
               str(out), *TINY, *RUN_ON]
    torchrun = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    wait_for_log_rows(out, 2, torchrun)
    os.kill(torchrun.pid, signum)  # torchrun only: it signals the ranks' process groups itself
    launcher_output = wait_or_kill(torchrun, 60)
    rank_output = "".join(open(path).read() for path in sorted(glob.glob(str(logs / "**" / "*.log"), recursive=True)))
    assert f"{signal.Signals(signum).name} received" in rank_output, rank_output[-2000:]
    assert "Traceback" not in rank_output and "DataLoader worker" not in rank_output, rank_output[-2000:]
    assert "DataLoader worker" not in launcher_output, launcher_output[-2000:]
    assert "forcefully exiting" not in launcher_output, "a rank outlived torchrun's grace and was killed"
    step = util.load_checkpoint(out / "ckpt.pt")["step"]
    assert 0 < step == step_reached(rank_output)
    if signum != signal.SIGTERM or start_method != "default":
        return  # a resume under torchrun, once is enough: below
    resume = [*two_ranks, "train.py", "--data_dir", images, "--out_dir", str(out), *TINY, *RUN_ON,
              "--max_steps", str(step + 2)]
    resumed = subprocess.run(resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and f"resuming at step {step}" in resumed.stderr, resumed.stderr[-2000:]
    assert util.load_checkpoint(out / "ckpt.pt")["step"] == step + 2


def test_ctrl_c_to_the_process_group_with_loader_workers_saves(images, tmp_path):
    """Ctrl-C in a terminal sends SIGINT to the whole foreground process group, loader workers included."""
    out = tmp_path / "run"
    command = [sys.executable, "train.py", "--data_dir", images, "--out_dir", str(out), *TINY, *RUN_ON]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    wait_for_log_rows(out, 2, process)
    os.killpg(process.pid, signal.SIGINT)
    stderr = wait_or_kill(process, 20)
    assert process.returncode == 0, stderr[-2000:]
    assert "SIGINT received" in stderr and "Traceback" not in stderr
    assert 0 < util.load_checkpoint(out / "ckpt.pt")["step"] == step_reached(stderr)


# -- torchrun: one rank's failure; train.sh's launch ---------------------------------------------------------------


def test_a_failure_on_one_rank_ends_the_torchrun_job_with_the_last_checkpoint_intact(images, tmp_path):
    """Rank 1 runs out of memory midway. On its way out it must not call destroy_process_group: NCCL's waits for
    collectives that the other ranks never join (here it blocks for good, as NCCL's does), so the rank would never
    exit, torchrun would never see the failure, and the job would hang. It must end within a minute instead, with a
    non-zero exit and the last checkpoint intact."""
    out = tmp_path / "run"
    launcher = tmp_path / "fail_on_rank_1.py"
    launcher.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {ROOT!r})
        import torch
        import torch.distributed as dist
        import train
        dist.destroy_process_group = lambda *args, **kwargs: time.sleep(3600)  # NCCL's, with a rank gone
        training_step = train.training_step

        def out_of_memory_on_rank_1(*args, **kwargs):
            if os.environ["RANK"] == "1" and args[7] == 5:  # the 6th step: after the saves at 2 and 4
                raise torch.OutOfMemoryError("rank 1 ran out of memory (a test)")
            return training_step(*args, **kwargs)

        train.training_step = out_of_memory_on_rank_1
        train.main(sys.argv[1:])
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
               "--data_dir", images, "--out_dir", str(out), *TINY, *RUN_ON, "--save_every", "2"]
    began = time.monotonic()
    job = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    output = wait_or_kill(job, 120)
    assert time.monotonic() - began < 60, "the job took over a minute to end"
    assert job.returncode != 0 and "rank 1 ran out of memory" in output, output[-2000:]
    assert util.load_checkpoint(out / "ckpt.pt")["step"] == 4


# torchrun's --shutdown-timeout (PET_SHUTDOWN_TIMEOUT, which train.sh sets); before it, a fixed 30 s
TORCHRUN_SHUTDOWN_TIMEOUT = "shutdown_timeout" in inspect.getsource(torchrun_script)


def test_train_sh_under_torchrun_outlives_its_terminal_and_has_time_to_save(images, tmp_path):
    """NPROC=2 sh train.sh --device cpu: train.sh's torchrun launch, two CPU processes. Started from a terminal that
    then closes (the kernel sends SIGHUP to what is left in its foreground), the run must go on: torchrun answers
    SIGHUP itself, whatever nohup set. Stopped by SIGTERM (train.sh's restart, or kill), rank 0 must have the time to
    save even when a slow disk takes longer than torchrun's default 30 s (here every save takes 33 s)."""
    out = tmp_path / "run"
    slow_disk = tmp_path / "slow_disk"
    slow_disk.mkdir()
    (slow_disk / "sitecustomize.py").write_text(textwrap.dedent("""
        import time
        import torch
        save = torch.save

        def slow_save(*args, **kwargs):
            time.sleep(33)
            save(*args, **kwargs)

        torch.save = slow_save
    """))
    env = dict(ENV, PYTHON=sys.executable, NPROC="2")
    if TORCHRUN_SHUTDOWN_TIMEOUT:
        env["PYTHONPATH"] = str(slow_disk)
    command = ["sh", "train.sh", "--data_dir", images, "--out_dir", str(out), *TINY, *RUN_ON]
    pid, terminal = pty.fork()  # the child: a new session, whose controlling terminal is the pty
    if pid == 0:
        os.chdir(ROOT)
        os.execvpe("sh", command, env)
    shown = b""
    try:
        while True:  # until train.sh exits: it waits for the run's first line
            try:
                chunk = os.read(terminal, 1024)
            except OSError:  # EIO: every process of the terminal's session has closed it
                break
            if not chunk:
                break
            shown += chunk
        assert os.waitpid(pid, 0)[1] == 0, shown.decode(errors="replace")
        os.close(terminal)  # the terminal closes: SIGHUP for its session
        run_pid = int((out / "train.pid").read_text())
        rows = len((out / "log.csv").read_text().splitlines()) if (out / "log.csv").exists() else 0
        assert wait_until(lambda: (out / "log.csv").exists() and len((out / "log.csv").read_text().splitlines())
                          > rows + 3, 60), (out / "train.log").read_text()[-2000:]
        assert alive(run_pid) and "SIGHUP" not in (out / "train.log").read_text()
        os.kill(run_pid, signal.SIGTERM)
        assert wait_until(lambda: not alive(run_pid), 90)
        log = (out / "train.log").read_text()
        assert "forcefully exiting" not in log and "SIGTERM received" in log, log[-2000:]
        assert util.load_checkpoint(out / "ckpt.pt")["step"] == step_reached(log)
    finally:
        if (out / "train.pid").exists():
            kill_tree(int((out / "train.pid").read_text()))


# -- resuming under another precision, or from another device's layout -----------------------------------------


@pytest.mark.parametrize("first, then", [("fp32", "fp16"), ("fp16", "fp32")])
def test_a_run_may_change_precision_between_resumes(images, tmp_path, first, then):
    """A run started on an A100 or a CPU (fp32, bf16) and resumed on a T4 (fp16), or the other way round, goes on:
    an fp16 checkpoint holds the GradScaler's state, any other an empty one."""
    out = tmp_path / "run"
    flags = ["--sample_every", "100000", "--save_every", "100000"]
    assert run(images, out, "--max_steps", "2", "--precision", first, *flags) == 2
    before = util.load_checkpoint(out / "ckpt.pt")["scaler"]
    assert run(images, out, "--max_steps", "3", "--precision", then, *flags) == 3
    after = util.load_checkpoint(out / "ckpt.pt")["scaler"]
    fp16_scaler, fp32_scaler = (before, after) if first == "fp16" else (after, before)
    assert fp16_scaler and fp16_scaler["scale"] == 2.0 ** 16 and fp32_scaler == {}


def channels_last_moments(optimizer_state):
    """The optimizer's state dict as a GPU run saves it: 4-D moments in channels_last (same values, other strides)."""
    state = {index: {name: value.contiguous(memory_format=torch.channels_last) if value.dim() == 4 else value
                     for name, value in moments.items()}
             for index, moments in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def test_channels_last_optimizer_state_resumes_like_a_contiguous_one(images, tmp_path):
    """A GPU run's checkpoint (channels_last AdamW moments) resumed on the CPU takes the same step as its contiguous
    twin: fused AdamW pairs each moment with its parameter element by element in memory."""
    run(images, tmp_path / "trained", "--max_steps", "2", "--sample_every", "100000", "--precision", "fp32")
    checkpoint = util.load_checkpoint(tmp_path / "trained" / "ckpt.pt")
    gpu_like = {**checkpoint, "optimizer": channels_last_moments(checkpoint["optimizer"])}
    for name, saved in (("contiguous", checkpoint), ("channels_last", gpu_like)):
        util.save_checkpoint(saved, tmp_path / name / "ckpt.pt")
    reloaded = util.load_checkpoint(tmp_path / "channels_last" / "ckpt.pt")["optimizer"]["state"]
    laid_out = [value for moments in reloaded.values() for value in moments.values() if value.dim() == 4]
    assert all(value.is_contiguous(memory_format=torch.channels_last) for value in laid_out)
    assert any(not value.is_contiguous() for value in laid_out)  # the file does hold NHWC moments
    weights = []
    for name in ("contiguous", "channels_last"):
        run(images, tmp_path / name, "--max_steps", "3", "--sample_every", "100000", "--precision", "fp32")
        weights.append(util.load_checkpoint(tmp_path / name / "ckpt.pt")["model"])
    for name, value in weights[0].items():
        assert torch.allclose(value, weights[1][name], atol=1e-6), name


def test_without_the_relayout_channels_last_moments_give_another_step():
    """The fault the test above pins is real: Optimizer.load_state_dict keeps the moments' layout, and fused AdamW
    on the CPU then moves a contiguous parameter by the moments of other elements."""
    def one_step_after_loading(layout):
        torch.manual_seed(0)
        parameter = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
        optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
        parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        state = optimizer.state_dict()
        if layout == "channels_last":
            state = channels_last_moments(state)
        resumed = torch.nn.Parameter(parameter.detach().clone())
        optimizer = torch.optim.AdamW([resumed], lr=0.1, fused=True)
        optimizer.load_state_dict(state)
        resumed.grad = torch.randn(resumed.shape, generator=torch.Generator().manual_seed(1))
        optimizer.step()
        return resumed.detach()

    contiguous, channels_last = one_step_after_loading("contiguous"), one_step_after_loading("channels_last")
    assert (contiguous - channels_last).abs().max() > 1e-3


# -- what a resume keeps, and what a stop does first -----------------------------------------------------------


def test_a_resume_keeps_no_tensor_of_the_checkpoint_it_read(images, tmp_path, monkeypatch):
    """A resumed run must not hold the checkpoint (on a GPU: about 0.7 GiB at anime64) beside the weights it loaded
    from it; it reads it to the CPU. The step counts AdamW adopts are its state, not a copy; the random state (5 KB on
    the CPU, whichever the device) may stay with the step in main's `resumed`."""
    out = tmp_path / "run"
    run(images, out, "--max_steps", "2", "--sample_every", "100000", "--precision", "fp32")
    loaded, devices, alive = [], set(), []
    load_checkpoint, training_step = util.load_checkpoint, train.training_step

    def record(value, key):
        if isinstance(value, torch.Tensor):
            loaded.append((key, weakref.ref(value)))
            devices.add(value.device.type)
        elif isinstance(value, (dict, list, tuple)):
            for name, item in value.items() if isinstance(value, dict) else enumerate(value):
                record(item, f"{key}.{name}" if key else str(name))

    def recording_load(path):
        checkpoint = load_checkpoint(path)
        record(checkpoint, "")
        return checkpoint

    def counting_step(*args, **kwargs):
        if not alive:
            gc.collect()
            optimizer = args[4]
            adopted = {id(value) for state in optimizer.state.values() for value in state.values()}
            alive.append([(key, ref()) for key, ref in loaded if ref() is not None and id(ref()) not in adopted
                          and not key.startswith("rng.")])
        return training_step(*args, **kwargs)

    monkeypatch.setattr(util, "load_checkpoint", recording_load)
    monkeypatch.setattr(train, "training_step", counting_step)
    assert run(images, out, "--max_steps", "3", "--sample_every", "100000", "--precision", "fp32") == 3
    assert len(loaded) > 10 and devices == {"cpu"}
    kept = alive[0]
    assert not kept, f"tensors of the checkpoint kept while training: {[(key, t.nbytes) for key, t in kept]} (bytes)"


def test_a_stop_on_a_sample_step_saves_before_it_samples(images, tmp_path, monkeypatch):
    """torchrun gives the ranks 30 s after SIGTERM: rank 0 must not draw a sample grid (64 images x 50 steps at
    anime64) before it saves."""
    out = tmp_path / "run"
    training_step, save_samples, grids = train.training_step, train.save_samples, []

    def stopped_at_the_second_step(*args, **kwargs):
        result = training_step(*args, **kwargs)
        if args[7] == 1:  # step index 1: the 2nd step, a sample step
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def recording_samples(ema, diffusion, config, step, *args, **kwargs):
        saved = (out / "ckpt.pt").exists() and util.load_checkpoint(out / "ckpt.pt")["step"]
        grids.append((step, saved))
        return save_samples(ema, diffusion, config, step, *args, **kwargs)

    monkeypatch.setattr(train, "training_step", stopped_at_the_second_step)
    monkeypatch.setattr(train, "save_samples", recording_samples)
    assert run(images, out, "--max_steps", "10", "--sample_every", "2", "--save_every", "100",
               "--precision", "fp32") == 2
    assert grids == [(2, 2)]  # the grid of step 2, drawn once ckpt.pt held step 2
    assert (out / "samples" / "000002.png").exists()


# -- train.sh without a GPU -----------------------------------------------------------------------------------


def test_train_sh_without_a_gpu_refuses_in_one_line(images, tmp_path):
    """sh train.sh on a machine without a CUDA GPU would start the 92M-parameter recipe on the CPU, for months."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("an earlier run's line\n")
    command = ["sh", os.path.join(ROOT, "train.sh"), "--data_dir", images, "--out_dir", str(out), *TINY]
    result = subprocess.run(command, env=dict(ENV, PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    try:
        lines = (result.stdout + result.stderr).splitlines()
        assert result.returncode != 0
        assert len(lines) == 1 and "GPU" in lines[0] and "--device cpu" in lines[0], lines
        assert not (out / "train.pid").exists()
        assert (out / "train.log").read_text() == "an earlier run's line\n"  # no run started
    finally:
        if (out / "train.pid").exists():  # a run started after all: stop it
            os.kill(int((out / "train.pid").read_text()), signal.SIGKILL)

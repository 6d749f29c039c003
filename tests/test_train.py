"""train.py: the dataset's checks, exact resume, crash safety, non-finite losses and DistributedDataParallel."""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
import util  # noqa: E402

TINY = ["--image_size", "16", "--base_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
        "--attention_resolutions", "8", "--num_heads", "2", "--num_timesteps", "50", "--batch_size", "4",
        "--num_workers", "0", "--num_samples", "4", "--warmup_steps", "2", "--log_every", "1"]


def write_images(folder, count, size=16, seed=0):
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(1, count + 1):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return folder


@pytest.fixture
def images(tmp_path):
    return write_images(str(tmp_path / "images"), 12)


def run(data_dir, out_dir, *flags):
    return train.main(["--data_dir", data_dir, "--out_dir", str(out_dir), *TINY, *flags])


# -- data ------------------------------------------------------------------------------------------------------

def test_dataset_yields_images_in_range_and_their_mirrors(images):
    assert len(util.NumberedImages(images, 16)) == 12  # sample.py and eval.py: the images as they are
    dataset = util.NumberedImages(images, 16, mirror=True)  # train.py: and their mirrors
    assert len(dataset) == 2 * 12
    x = dataset[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    pixels = torch.from_numpy(__import__("numpy").array(Image.open(os.path.join(images, "4.png")))).permute(2, 0, 1)
    assert torch.allclose(x, pixels.float() / 127.5 - 1)
    assert torch.equal(dataset[12 + 3], x.flip(-1))  # index N + i is image i mirrored: the horizontal flip


def test_dataset_converts_modes_and_sizes_to_rgb_squares(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("L", (16, 16), 0).save(folder / "1.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(folder / "2.png")  # fully transparent
    Image.new("RGB", (40, 20), (0, 0, 255)).save(folder / "3.png")  # wide, and larger than 16
    dataset = util.NumberedImages(str(folder), 16)
    gray, transparent, wide = dataset[0], dataset[1], dataset[2]
    assert gray.shape == transparent.shape == wide.shape == (3, 16, 16)
    assert torch.all(gray == -1)
    assert torch.all(transparent == 1), "transparent pixels must become white, not black"
    assert torch.allclose(wide[2], torch.ones(16, 16), atol=1e-2) and torch.allclose(wide[0], -torch.ones(16, 16), atol=1e-2)


def test_dataset_names_the_missing_file_of_a_gap(tmp_path):
    folder = write_images(str(tmp_path / "gap"), 5)
    os.remove(os.path.join(folder, "3.png"))
    with pytest.raises(FileNotFoundError, match=r"3\.png is missing") as error:
        util.NumberedImages(folder, 16)
    assert "util.py prepare" in str(error.value)


def test_dataset_rejects_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no numbered PNGs"):
        util.NumberedImages(str(tmp_path / "empty"), 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        util.NumberedImages(str(tmp_path / "nowhere"), 16)


def test_corrupt_image_is_reported_and_skipped(images, capsys):
    with open(os.path.join(images, "5.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    dataset = util.NumberedImages(images, 16)
    x = dataset[4]
    assert torch.equal(x, dataset[5]), "the next image replaces the corrupt one"
    assert "5.png" in capsys.readouterr().err


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    def first(n, sampler):
        return [index for _, index in zip(range(n), iter(sampler))]
    stream = first(50, train.shuffle_forever(20, seed=3))
    assert sorted(stream[:20]) == list(range(20)) and sorted(stream[20:40]) == list(range(20))
    assert first(23, train.shuffle_forever(20, seed=3, start=27)) == stream[27:]
    rank0, rank1 = first(10, train.shuffle_forever(20, 3, rank=0, world_size=2)), first(10, train.shuffle_forever(20, 3, rank=1, world_size=2))
    assert sorted(rank0 + rank1) == list(range(20))


@pytest.mark.parametrize("flags, processes", [([], 0), (["--num_workers", "2"], 2)])
def test_a_cpu_run_loads_batches_in_its_own_process_unless_told_otherwise(images, flags, processes):
    """On a CPU the cores are training: by default no loader process competes with them; --num_workers N starts N."""
    args = train.parse_args(["--data_dir", images, "--image_size", "16", "--batch_size", "4", *flags])
    before = set(multiprocessing.active_children())
    batches = train.load_batches(train.load_dataset(args), args, 0, 0, 1, torch.device("cpu"))
    x0, y = next(batches)
    started = set(multiprocessing.active_children()) - before
    batches.close()
    assert x0.shape == (4, 3, 16, 16) and y is None
    assert len(started) == processes


# -- training --------------------------------------------------------------------------------------------------

def test_training_smoke_writes_checkpoint_log_and_samples(images, tmp_path):
    out = tmp_path / "run"
    assert run(images, out, "--max_steps", "4", "--sample_every", "2") == 4
    checkpoint = util.load_checkpoint(out / "ckpt.pt")
    assert set(checkpoint) == {"model", "ema", "optimizer", "scaler", "diffusion", "step", "config", "rng"}
    assert checkpoint["step"] == 4 and checkpoint["config"]["base_channels"] == 16
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0] == "step,loss,mse,vb,lr,grad_norm,images_per_s,elapsed_s,skipped,loss_scale" and len(rows) == 1 + 4
    assert all(float(row.split(",")[1]) > 0 for row in rows[1:])
    grid = Image.open(out / "samples" / "000004.png")
    assert grid.size == (2 + 2 * (16 + 2), 2 + 2 * (16 + 2))  # 4 samples, 2 x 2 with padding 2
    assert (out / "samples" / "000002.png").exists()
    model, _ = util.build_model_and_diffusion(checkpoint["config"])
    model.load_state_dict(checkpoint["ema"])  # the checkpoint alone rebuilds the model


def test_compiled_training_is_the_eager_training(images, tmp_path, monkeypatch):
    """--compile: dynamo captures the model and AOTAutograd its backward, and the weights come out as without it.
    The aot_eager backend runs the captured graphs with eager kernels: the same numbers, and no two minutes of
    inductor's C++ compiling on a CPU. Dropout off: compiled code draws its masks with nn.Dropout's kernel."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile(model, backend="aot_eager", **kwargs))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    flags = ["--max_steps", "3", "--sample_every", "0", "--precision", "fp32", "--dropout", "0"]
    run(images, tmp_path / "compiled", *flags, "--compile")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    run(images, tmp_path / "eager", *flags)
    a, b = util.load_checkpoint(tmp_path / "compiled" / "ckpt.pt"), util.load_checkpoint(tmp_path / "eager" / "ckpt.pt")
    assert graphs >= 1, "nothing was compiled"
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])


@pytest.mark.parametrize("step, rate, decay", [(0, 0.9999, 1 / 10), (90, 0.9999, 91 / 100), (20000, 0.999, 0.999)])
def test_the_ema_follows_the_weights_at_its_warmed_up_decay(step, rate, decay):
    """DDPM sec. 4's EMA after each step: ema <- decay ema + (1 - decay) weights, with decay = min(--ema_rate,
    (1 + step) / (10 + step)), so that a short run's EMA is not mostly its initialisation."""
    args = train.parse_args([*TINY, "--ema_rate", str(rate), "--out_dir", os.path.join(os.sep, "nonexistent")])
    model, ema, diffusion, optimizer, scaler, _ = train.build_or_resume(args, vars(args), torch.device("cpu"), None)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))  # an EMA apart from the weights
    ema_before = [p.clone() for p in ema.parameters()]
    train.training_step(model, model, ema, diffusion, optimizer, scaler, torch.rand(4, 3, 16, 16) * 2 - 1, step, args,
                        None)
    for before, weight, after in zip(ema_before, model.parameters(), ema.parameters(), strict=True):
        assert torch.allclose(after, decay * before + (1 - decay) * weight, rtol=1e-5, atol=1e-6)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(images, tmp_path):
    flags = ["--importance_sampling", "--dropout", "0.1", "--seed", "7", "--save_every", "100", "--sample_every", "0"]
    run(images, tmp_path / "straight", "--max_steps", "6", *flags)
    run(images, tmp_path / "resumed", "--max_steps", "3", *flags)
    halfway = util.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    run(images, tmp_path / "resumed", "--max_steps", "6", *flags)
    a, b = util.load_checkpoint(tmp_path / "straight" / "ckpt.pt"), util.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "diffusion"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), f"optimizer {index}.{name} differs"
    assert a["diffusion"]["loss_counts"].sum() == 6 * 4
    assert any(not torch.equal(halfway["model"][name], b["model"][name]) for name in b["model"]), "steps 4-6 trained"


def test_sample_grids_do_not_change_the_training_run(images, tmp_path):
    """Sampling draws its own noise from a forked random stream: the weights must not depend on when it runs."""
    run(images, tmp_path / "without", "--max_steps", "4", "--sample_every", "0", "--dropout", "0.1")
    run(images, tmp_path / "with", "--max_steps", "4", "--sample_every", "1", "--dropout", "0.1")
    assert sorted(os.listdir(tmp_path / "with" / "samples")) == [f"00000{i}.png" for i in range(1, 5)]
    a, b = util.load_checkpoint(tmp_path / "without" / "ckpt.pt"), util.load_checkpoint(tmp_path / "with" / "ckpt.pt")
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_resumed_log_drops_rows_logged_after_the_checkpoint(images, tmp_path):
    out = tmp_path / "run"
    run(images, out, "--max_steps", "4", "--sample_every", "0")
    with open(out / "log.csv", "a") as f:  # what a run killed (kill -9) after its last save leaves behind
        f.write("5,1.0,1.0,0.1,0.001,1.0,10.0,1.0\n6,1.0,1.0,0.1,0.001,1.0,10.0,1.0\n")
    run(images, out, "--max_steps", "6", "--sample_every", "0")
    steps = [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3", "4", "5", "6"]
    assert "1.0,1.0,0.1" not in (out / "log.csv").read_text()


def test_resume_refuses_a_checkpoint_of_another_architecture(images, tmp_path):
    run(images, tmp_path / "run", "--max_steps", "1", "--sample_every", "0")
    with pytest.raises(SystemExit, match="--base_channels 16 \\(now 32\\)"):
        run(images, tmp_path / "run", "--max_steps", "2", "--base_channels", "32")


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(images, tmp_path, monkeypatch):
    build = util.build_model_and_diffusion

    def build_with_a_loss_that_explodes(config):
        model, diffusion = build(config)
        calls = []
        original = diffusion.training_losses

        def training_losses(*args, **kwargs):
            calls.append(1)
            losses = original(*args, **kwargs)
            if len(calls) >= 5:  # the 5th step
                losses["loss"] = losses["loss"] * float("nan")
            return losses
        diffusion.training_losses = training_losses
        return model, diffusion

    monkeypatch.setattr(util, "build_model_and_diffusion", build_with_a_loss_that_explodes)
    with pytest.raises(SystemExit, match="non-finite at step 5; stopped without saving"):
        run(images, tmp_path / "run", "--max_steps", "10", "--save_every", "2", "--log_every", "3", "--sample_every", "0")
    checkpoint = util.load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_sigterm_saves_a_checkpoint_that_resumes(images, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--data_dir", images, "--out_dir", str(out), *TINY,
               "--max_steps", "100000", "--save_every", "100000", "--sample_every", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len((out / "log.csv").read_text().splitlines() if (out / "log.csv").exists() else []) < 4:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 0, stderr
    assert "SIGTERM received" in stderr
    step = util.load_checkpoint(out / "ckpt.pt")["step"]
    assert 3 <= step < 100000
    assert run(images, out, "--max_steps", str(step + 2), "--sample_every", "0") == step + 2


def test_torchrun_two_processes_keep_identical_weights(images, tmp_path):
    out = tmp_path / "ddp"
    # A launcher that runs train.main and then lets every rank save the weights it ended with.
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {ROOT!r})
        import train, util
        built = []
        build = util.build_model_and_diffusion
        util.build_model_and_diffusion = lambda config: built.append(build(config)) or built[-1]
        train.main(sys.argv[1:])
        torch.save(built[0][0].state_dict(), os.path.join({str(out)!r}, "rank" + os.environ["RANK"] + ".pt"))
    """))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
               "--data_dir", images, "--out_dir", str(out), *TINY, "--max_steps", "3", "--sample_every", "0",
               "--importance_sampling"]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    checkpoint = util.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["step"] == 3
    assert checkpoint["diffusion"]["loss_counts"].sum() == 3 * 4 * 2  # both ranks' losses in the history
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.csv", "loss.png", "rank0.pt", "rank1.pt", "samples"]
    assert all(torch.equal(rank0[name], checkpoint["model"][name]) for name in rank0)


# -- train.sh --------------------------------------------------------------------------------------------------


def log_rows(out):
    return len((out / "log.csv").read_text().splitlines()) if (out / "log.csv").exists() else 0


def wait_until(condition, seconds=120):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.2)
    return condition()


def alive(pid):
    """Running, not exited (a process train.sh started is not our child: once it exits it may linger unreaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_train_sh_restarts_its_own_run_which_resumes_and_leaves_other_processes_alone(images, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stranger = subprocess.Popen(["sleep", "60"])  # a process train.sh did not start, its pid planted in the pid file
    (out / "train.pid").write_text(f"{stranger.pid}\n")
    command = ["sh", os.path.join(ROOT, "train.sh"), "--data_dir", images, "--out_dir", str(out), *TINY,
               "--max_steps", "100000", "--save_every", "100000", "--sample_every", "0", "--device", "cpu"]
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    pids = []
    try:
        subprocess.run(command, check=True, timeout=60, env=env, capture_output=True)
        assert alive(stranger.pid)  # not signalled: its command line is not train.py
        pids.append(int((out / "train.pid").read_text()))
        assert wait_until(lambda: log_rows(out) >= 4)

        restart = subprocess.run(command, check=True, timeout=120, env=env, capture_output=True, text=True)
        assert f"stopping the run started before (pid {pids[0]})" in restart.stdout
        assert not alive(pids[0])
        step = util.load_checkpoint(out / "ckpt.pt")["step"]  # saved on SIGTERM
        pids.append(int((out / "train.pid").read_text()))
        assert pids[1] != pids[0]
        assert wait_until(lambda: f"resuming at step {step}" in (out / "train.log").read_text())
        log = (out / "train.log").read_text()
        assert "SIGTERM received" in log and log.count("parameters") == 2  # both runs append to one train.log
    finally:
        for pid in pids + [stranger.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGTERM)
        stranger.wait()


def test_train_sh_shows_a_failed_start_and_exits_nonzero(tmp_path):
    out = tmp_path / "run"
    command = ["sh", os.path.join(ROOT, "train.sh"), "--data_dir", str(tmp_path / "nowhere"), "--out_dir", str(out),
               "--device", "cpu"]
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, timeout=120, env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"data folder '{tmp_path / 'nowhere'}' does not exist" in result.stderr
    assert not (out / "train.pid").exists()


def test_dropout_outside_zero_to_one_is_refused(tmp_path):
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit, match=f"--dropout {float(bad)} must be at least 0 and below 1"):
            train.main(["--dropout", bad, "--out_dir", str(tmp_path / "run")])


# -- TensorBoard -----------------------------------------------------------------------------------------------


def test_tensorboard_gets_the_logged_figures_and_the_sample_grids(images, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    run(images, out, "--max_steps", "4", "--log_every", "2", "--sample_every", "2", "--tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()]
    header = rows[0]
    for column in ("loss", "mse", "vb", "lr", "grad_norm", "images_per_s"):
        logged = [(event.step, event.value) for event in events.Scalars(f"train/{column}")]
        assert logged == [(int(row[0]), pytest.approx(float(row[header.index(column)]), rel=1e-6)) for row in rows[1:]]
    assert "train/loss_scale" not in events.Tags()["scalars"]  # bf16 or fp32 here: no gradient scaler, no scale
    grids = events.Images("samples")
    assert [image.step for image in grids] == [2, 4]
    grid = Image.open(out / "samples" / "000004.png")
    assert (grids[-1].width, grids[-1].height) == grid.size


def test_tensorboard_missing_is_one_line_and_the_run_goes_on(images, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    assert run(images, tmp_path / "run", "--max_steps", "2", "--sample_every", "0", "--tensorboard") == 2
    assert "tensorboard is not installed, so no OUT/tensorboard/: pip install tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "run" / "tensorboard").exists()

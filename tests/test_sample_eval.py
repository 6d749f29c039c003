"""sample.py and eval.py on tiny checkpoints: what they write, that it repeats and resumes, bits/dim, bad input."""
import importlib
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402
from test_util import WritesAFileWhenUnpickled  # noqa: E402

evaluate = importlib.import_module("eval")  # the script eval.py; the name `eval` is Python's built-in

SIZE, T = 16, 50
TINY = ["--image_size", str(SIZE), "--base_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
        "--attention_resolutions", "8", "--num_heads", "2", "--num_timesteps", str(T), "--batch_size", "4",
        "--num_workers", "0", "--num_samples", "4", "--warmup_steps", "10", "--log_every", "1000",
        "--sample_every", "0", "--lr", "1e-3", "--ema_rate", "0.99"]


def smooth_images(folder, count=4):
    """count 16x16 images, each a colour gradient: structure a model learns in a few hundred steps."""
    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 1, SIZE)
    for n in range(1, count + 1):
        colour = np.array([n / count, 1 - n / count, 0.5])
        pixels = 255 * colour[None, None, :] * ramp[None, :, None] * np.ones((SIZE, 1, 1))  # (H, W, 3)
        Image.fromarray(pixels.round().astype(np.uint8)).save(os.path.join(folder, f"{n}.png"))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained tiny checkpoint (150 steps on 4 images: bits/dim about half the untrained one's) and an untrained
    one (step 0, the same data)."""
    base = tmp_path_factory.mktemp("runs")
    images = smooth_images(str(base / "images"))
    train.main(["--data_dir", images, "--out_dir", str(base / "trained"), *TINY, "--max_steps", "150"])
    train.main(["--data_dir", images, "--out_dir", str(base / "untrained"), *TINY, "--max_steps", "0"])
    return base


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def pngs(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


# ----------------------------------------------------------------------------------------------------------
# sample.py


def test_sample_writes_n_pngs_and_an_npz_that_equals_them(run_dir, tmp_path):
    out = tmp_path / "samples"
    sample.main([str(run_dir / "trained" / "ckpt.pt"), "--num", "10", "--batch_size", "4", "--steps", "10",
                 "--out", str(out), "--npz", str(tmp_path / "s.npz")])
    assert pngs(out) == sorted(f"{i}.png" for i in range(1, 11))
    images = np.stack([pixels(out / f"{i}.png") for i in range(1, 11)])
    assert images.shape == (10, SIZE, SIZE, 3)
    array = np.load(tmp_path / "s.npz")["arr_0"]
    assert array.shape == (10, SIZE, SIZE, 3) and array.dtype == np.uint8
    assert np.array_equal(array, images)
    assert len({image.tobytes() for image in images}) == 10  # every image its own noise


def test_sample_repeats_with_the_same_seed_and_differs_with_another(run_dir, tmp_path):
    ckpt = str(run_dir / "trained" / "ckpt.pt")
    flags = ["--num", "6", "--batch_size", "4", "--steps", "10"]
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        sample.main([ckpt, *flags, "--seed", seed, "--out", str(tmp_path / name)])
    for i in range(1, 7):
        assert np.array_equal(pixels(tmp_path / "a" / f"{i}.png"), pixels(tmp_path / "b" / f"{i}.png"))
        assert not np.array_equal(pixels(tmp_path / "a" / f"{i}.png"), pixels(tmp_path / "c" / f"{i}.png"))
    # image i does not depend on --num: the first 6 of 10 images are the 6 images above
    sample.main([ckpt, *flags[2:], "--num", "10", "--seed", "3", "--out", str(tmp_path / "d")])
    for i in range(1, 7):
        assert np.array_equal(pixels(tmp_path / "a" / f"{i}.png"), pixels(tmp_path / "d" / f"{i}.png"))


def test_sample_restart_writes_only_the_missing_batch_and_the_same_pixels(run_dir, tmp_path, monkeypatch):
    command = [str(run_dir / "trained" / "ckpt.pt"), "--num", "10", "--batch_size", "4", "--steps", "10",
               "--out", str(tmp_path / "s")]
    sample.main(command)
    before = {i: pixels(tmp_path / "s" / f"{i}.png") for i in range(1, 11)}
    for i in (9, 10, 7):  # the last batch (9, 10) and one image of the batch before it (5-8): a run cut off
        os.remove(tmp_path / "s" / f"{i}.png")
    written = []
    save_png = sample.save_png
    monkeypatch.setattr(sample, "save_png", lambda image, path: written.append(os.path.basename(path)) or
                        save_png(image, path))
    sample.main(command)
    assert sorted(written) == sorted(f"{i}.png" for i in (5, 6, 7, 8, 9, 10))  # whole batches, nothing else
    for i in range(1, 11):
        assert np.array_equal(pixels(tmp_path / "s" / f"{i}.png"), before[i]), f"{i}.png changed"


def test_sample_refuses_a_folder_of_another_run(run_dir, tmp_path):
    ckpt = str(run_dir / "trained" / "ckpt.pt")
    out = str(tmp_path / "s")
    sample.main([ckpt, "--num", "2", "--batch_size", "2", "--steps", "5", "--out", out])
    with pytest.raises(SystemExit, match=r"holds images of another sampling run \(seed 0 \(now 1\)\)"):
        sample.main([ckpt, "--num", "2", "--batch_size", "2", "--steps", "5", "--out", out, "--seed", "1"])
    smooth_images(str(tmp_path / "foreign"), 2)
    with pytest.raises(SystemExit, match="already holds numbered PNGs that sample.py did not write"):
        sample.main([ckpt, "--num", "2", "--steps", "5", "--out", str(tmp_path / "foreign")])


# ----------------------------------------------------------------------------------------------------------
# eval.py


def test_load_model_gives_the_ema_weights_channels_last_with_the_same_outputs(run_dir):
    path = run_dir / "trained" / "ckpt.pt"
    model, _, config, _ = util.load_model(path)
    assert model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)  # NHWC: faster sampling
    reference, _ = util.build_model_and_diffusion(config)  # NCHW, with the file's EMA weights put in by hand
    reference.load_state_dict(util.load_checkpoint(path)["ema"])
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 40])
    with torch.no_grad():
        assert torch.allclose(model(x, t), reference.eval()(x, t), atol=1e-5)


def test_eval_writes_every_picture_with_the_right_sizes(run_dir, tmp_path):
    out = tmp_path / "eval"
    evaluate.main([str(run_dir / "trained" / "ckpt.pt"), "--out", str(out)])
    cell = SIZE + 2  # each image with the 2 px padding of the grids
    assert Image.open(out / "grid.png").size == (2 + 4 * cell, 2 + 4 * cell)
    assert pngs(out / "process") == pngs(out / "pred_x0") == sorted(f"{n}.png" for n in range(1, 17))
    # 20 frames of T = 50 steps, enlarged 4x to 64 px so that an 18 px row of labels t=50 ... t=1 fits under them
    strip_size = (4 * (2 + 20 * cell), 4 * (2 + cell) + 18)
    assert Image.open(out / "process" / "1.png").size == Image.open(out / "pred_x0" / "16.png").size == strip_size
    gif = Image.open(out / "denoise.gif")
    assert gif.n_frames == 50 and gif.size == (2 + 4 * cell, 2 + 4 * cell)
    # steps.png: columns K = 10, 25 and T = 50, 8 rows, images enlarged 4x to 64 px, an 18 px label row on top
    assert Image.open(out / "steps.png").size == (4 * (2 + 3 * cell), 18 + 4 * (2 + 8 * cell))

    grid = pixels(out / "grid.png")
    for n in range(16):
        row, column = divmod(n, 4)
        in_grid = grid[2 + row * cell:][:SIZE, 2 + column * cell:][:, :SIZE]
        strip = pixels(out / "process" / f"{n + 1}.png")[:4 * (2 + cell):4, ::4]  # the frames, at their own size
        last_frame = strip[2:2 + SIZE, 2 + 19 * cell:2 + 19 * cell + SIZE]
        assert np.array_equal(last_frame, in_grid), f"process/{n + 1}.png does not end in the grid's image"
        first_frame = strip[2:2 + SIZE, 2:2 + SIZE].astype(float)
        assert np.abs(first_frame - last_frame).mean() > 10  # it starts from noise


def test_eval_steps_and_seed_decide_the_pictures(run_dir, tmp_path):
    ckpt = str(run_dir / "trained" / "ckpt.pt")
    for name, seed in [("a", "5"), ("b", "5"), ("c", "6")]:
        evaluate.main([ckpt, "--steps", "5", "--ddim", "--seed", seed, "--out", str(tmp_path / name)])
    assert np.array_equal(pixels(tmp_path / "a" / "grid.png"), pixels(tmp_path / "b" / "grid.png"))
    assert not np.array_equal(pixels(tmp_path / "a" / "grid.png"), pixels(tmp_path / "c" / "grid.png"))
    assert Image.open(tmp_path / "a" / "process" / "1.png").size == (4 * (2 + 5 * (SIZE + 2)), 4 * (SIZE + 4) + 18)
    assert Image.open(tmp_path / "a" / "denoise.gif").n_frames == 5
    # steps.png: no column above --steps (K = 10, 25 and T = 50 are left out), so one column, K = 5
    assert Image.open(tmp_path / "a" / "steps.png").size == (4 * (2 + SIZE + 2), 18 + 4 * (2 + 8 * (SIZE + 2)))


def nll_of(ckpt, data_dir, out, capsys):
    """Runs eval.py --nll; returns (printed total, printed prior, nll.csv's rows)."""
    evaluate.main([ckpt, "--steps", "2", "--nll", data_dir, "--out", str(out)])
    printed = capsys.readouterr().out
    total = float(re.search(r"bits/dim on 4 images of .*: ([0-9.]+) ± ([0-9.]+)", printed).group(1))
    prior = float(re.search(r"prior L_T: ([0-9.e+-]+)", printed).group(1))
    rows = np.loadtxt(out / "nll.csv", delimiter=",", skiprows=1)  # t, vb_bpd, mse
    return total, prior, rows


def with_live_weights(ckpt, path):
    """A copy of ckpt at path with every EMA weight perturbed: after a few steps the zero-initialised output layers
    are still near zero, and a condition (a label, a low-resolution image) barely reaches the output."""
    checkpoint = util.load_checkpoint(ckpt)
    generator = torch.Generator().manual_seed(0)
    for weight in checkpoint["ema"].values():
        if weight.is_floating_point():
            weight += 0.05 * torch.randn(weight.shape, generator=generator)
    torch.save(checkpoint, path)
    return str(path)


def bound_by_hand(ckpt, data_dir, condition, seed=0):
    """Each L_t in bits/dim, averaged over data_dir's images, with the model given condition(x0, model) as its
    model_kwargs: what eval.py --nll writes to nll.csv's vb_bpd column, when it conditions the model so."""
    model, diffusion, config, step = util.load_model(ckpt, torch.device("cpu"), use_ema=True)
    dataset = util.NumberedImages(data_dir, config["image_size"])
    x0 = torch.stack([dataset[i] for i in range(len(dataset))])  # (N, 3, H, W)
    torch.manual_seed(seed)  # eval.py --seed: the same x_t for every term
    return diffusion.bpd(model, x0, model_kwargs=condition(x0, model))["vb"].mean(dim=0).double()  # (T,)


def nll_csv_vb(ckpt, data_dir, out):
    """eval.py CKPT --nll DATA_DIR: nll.csv's vb_bpd column (T,)."""
    evaluate.main([ckpt, "--steps", "2", "--nll", data_dir, "--out", str(out)])
    return torch.from_numpy(np.loadtxt(out / "nll.csv", delimiter=",", skiprows=1)[:, 1])


def test_nll_terms_sum_to_the_total_and_training_lowers_it(run_dir, tmp_path, capsys):
    images = str(run_dir / "images")
    trained = nll_of(str(run_dir / "trained" / "ckpt.pt"), images, tmp_path / "trained", capsys)
    untrained = nll_of(str(run_dir / "untrained" / "ckpt.pt"), images, tmp_path / "untrained", capsys)
    for total, prior, rows in (trained, untrained):
        assert math.isfinite(total) and total > 0
        assert rows.shape == (T, 3) and np.array_equal(rows[:, 0], np.arange(T))
        assert np.isfinite(rows).all() and (rows[:, 1] > 0).all()
        assert rows[:, 1].sum() + prior == pytest.approx(total, abs=1e-4)  # printed with 4 decimals
        assert 0 <= prior < 1e-3  # the cosine schedule leaves almost nothing of x_0 at t = T
    assert (tmp_path / "trained" / "nll.png").exists()
    assert trained[0] < 0.7 * untrained[0], (trained[0], untrained[0])  # it learned these 4 images
    assert trained[2][:, 2].mean() < untrained[2][:, 2].mean()  # and predicts their noise better


# ----------------------------------------------------------------------------------------------------------
# bad input: one line that names the file and what to do, a non-zero exit, no traceback


def fail_lines(*commands):
    """Runs each command (script, *args) in a process of its own, all at once; each must fail with one line on
    stderr and no traceback. Returns those lines, in order."""
    processes = [subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for script, *args in commands]
    lines = []
    for process in processes:
        _, stderr = process.communicate(timeout=240)
        assert process.returncode != 0, stderr
        assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
        lines.append(stderr.strip())
    return lines


def fails_with_one_line(script, *args):
    return fail_lines((script, *args))[0]


def test_bad_checkpoints_are_refused_in_one_line(run_dir, tmp_path):
    missing = tmp_path / "nope.pt"
    not_a_checkpoint = tmp_path / "picture.pt"
    Image.new("RGB", (4, 4)).save(not_a_checkpoint, format="PNG")
    some_dict = tmp_path / "dict.pt"
    torch.save({"weights": torch.zeros(2)}, some_dict)
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": WritesAFileWhenUnpickled(marker)}, evil)
    checkpoint = util.load_checkpoint(run_dir / "trained" / "ckpt.pt")
    checkpoint["config"]["base_channels"] = 32  # the weights are of a 16-channel model
    util.save_checkpoint(checkpoint, tmp_path / "changed.pt")
    lines = fail_lines(("sample.py", missing), ("eval.py", missing), ("eval.py", not_a_checkpoint),
                       ("sample.py", some_dict), ("eval.py", evil), ("eval.py", tmp_path / "changed.pt"))

    for line in lines[:2]:
        assert "nope.pt does not exist" in line and "train" in line
    assert "picture.pt is not a checkpoint made by this project" in lines[2]
    assert "dict.pt is not a checkpoint made by this project" in lines[3]
    assert "refused to load" in lines[4] and "evil.pt" in lines[4] and "could run code" in lines[4]
    assert not marker.exists()  # the code did not run
    assert "the weights in" in lines[5] and "changed.pt do not fit the model its config describes" in lines[5]


def test_bad_nll_folders_are_refused_in_one_line(run_dir, tmp_path):
    ckpt = run_dir / "trained" / "ckpt.pt"
    (tmp_path / "empty").mkdir()
    gaps = smooth_images(str(tmp_path / "gaps"), 4)
    os.remove(os.path.join(gaps, "2.png"))
    nowhere, empty, gap, *steps = fail_lines(
        ("eval.py", ckpt, "--nll", tmp_path / "nowhere"), ("eval.py", ckpt, "--nll", tmp_path / "empty"),
        ("eval.py", ckpt, "--nll", gaps), ("sample.py", ckpt, "--steps", 1), ("sample.py", ckpt, "--steps", T + 1))
    assert "nowhere" in nowhere and "does not exist" in nowhere and "util.py prepare" in nowhere
    assert "no numbered PNGs" in empty and "util.py prepare" in empty
    assert os.path.join(gaps, "2.png") in gap and "renumber" in gap
    for count, line in zip((1, T + 1), steps):
        assert f"--steps {count} must be between 2 and the T = {T}" in line

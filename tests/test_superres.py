"""Super-resolution models: the condition (shrink, round to 8 bits, enlarge), the UNet's extra input channels,
sample.py --low_res and eval.py's comparison, and their bad inputs."""
import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402
from test_diffusion import Ref  # noqa: E402
from test_sample_eval import TINY, bound_by_hand, fail_lines, nll_csv_vb, smooth_images, with_live_weights  # noqa: E402
from test_unet import bilinear_by_hand  # noqa: E402

evaluate = importlib.import_module("eval")  # the script eval.py; the name `eval` is Python's built-in

SIZE, LOW = 16, 4  # TINY trains 16x16 images; these models make them from 4x4 ones


def random_pixels(shape, seed):
    """Images as a PNG holds them: whole 8-bit levels, mapped to [-1, 1]."""
    levels = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))
    return levels.float() / 127.5 - 1


def test_downsample_is_the_block_mean_rounded_to_8_bits():
    x = random_pixels((2, 3, SIZE, SIZE), seed=0)
    k = SIZE // LOW
    block_means = x.reshape(2, 3, LOW, k, LOW, k).mean(dim=(3, 5))  # each low-res pixel: its 4x4 block's mean
    expected = torch.round((block_means + 1) * 127.5) / 127.5 - 1
    assert torch.allclose(util.downsample(x, LOW), expected, atol=1e-6)
    levels = (util.downsample(x, LOW) + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # what a PNG can store


def test_the_model_sees_x_t_beside_the_shrunk_and_enlarged_x0():
    args = train.parse_args([*TINY, "--super_res_from", str(LOW)])
    config = {**vars(args), "classes": None}
    model, diffusion = util.build_model_and_diffusion(config)
    assert model.input_conv.in_channels == 2 * 3 and model.in_channels == 3  # x_t and the condition
    assert model.out[-1].out_channels == 2 * 3  # eps and v for the 3 colour channels, as without the condition
    seen = []
    model.input_conv.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    ema = util.build_model_and_diffusion(config)[0].requires_grad_(False)
    x0 = random_pixels((4, 3, SIZE, SIZE), seed=2)
    train.training_step(model, model, ema, diffusion, train.build_optimizer(model, args),
                        torch.amp.GradScaler("cpu", enabled=False), x0, 0, args, None)
    (network_input,) = seen  # (4, 6, 16, 16)
    k = SIZE // LOW
    low_res = torch.round((x0.reshape(4, 3, LOW, k, LOW, k).mean(dim=(3, 5)) + 1) * 127.5) / 127.5 - 1
    assert network_input.shape == (4, 6, SIZE, SIZE)
    assert torch.allclose(network_input[:, 3:], bilinear_by_hand(low_res, SIZE), atol=1e-5)
    assert not torch.allclose(network_input[:, :3], network_input[:, 3:], atol=0.1)  # the first three are x_t


@pytest.fixture(scope="module")
def superres_run(tmp_path_factory):
    """A super-resolution checkpoint (4x4 -> 16x16, a few steps), its training images and a folder of 4x4 ones."""
    base = tmp_path_factory.mktemp("superres")
    images = smooth_images(str(base / "images"), count=5)
    train.main(["--data_dir", images, "--out_dir", str(base / "run"), *TINY, "--max_steps", "3",
                "--super_res_from", str(LOW), "--num_samples", "4", "--sample_every", "3"])
    small = base / "small"
    small.mkdir()
    for n in range(1, 6):
        Image.fromarray(np.full((LOW, LOW, 3), 40 * n, dtype=np.uint8)).save(small / f"{n}.png")
    return base


def test_checkpoint_and_training_grid(superres_run):
    config = util.load_checkpoint(superres_run / "run" / "ckpt.pt")["config"]
    assert config["super_res_from"] == LOW
    model, _, _, _ = util.load_model(superres_run / "run" / "ckpt.pt")
    assert model.cond_channels == 3
    # 4 samples in whole rows of isqrt(4) = 2, each row shown three times: low-res, sample, original, labelled so
    # beside them (which enlarges the images 4x, to 64 px)
    cell = SIZE + 2
    grid = Image.open(superres_run / "run" / "samples" / "000003.png")
    assert grid.height == 4 * (2 + 6 * cell) and grid.width > 4 * (2 + 2 * cell) + 30


class Oracle(torch.nn.Module):
    """Predicts the eps that makes x^_0 = its condition enlarged (bilinear, as the UNet does), exactly: sampling then
    ends there, so each output shows which input it was given."""
    in_channels = 3

    def __init__(self, T):
        super().__init__()
        self.abar = torch.from_numpy(Ref("cosine", T).abar).float()

    def forward(self, x_t, t, low_res):
        low_res = F.interpolate(low_res, size=x_t.shape[-2:], mode="bilinear")  # (B, 3, S, S) -> (B, 3, H, W)
        a = self.abar[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * low_res) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)  # v = 0: any variance ends at x^_0


def test_sample_enlarges_each_input_into_the_output_of_the_same_number(superres_run, tmp_path, monkeypatch):
    _, diffusion, config, _ = util.load_model(superres_run / "run" / "ckpt.pt")
    monkeypatch.setattr(util, "load_model", lambda path, device, use_ema: (Oracle(config["num_timesteps"]),
                                                                           diffusion, config, 3))
    small = tmp_path / "small"
    small.mkdir()
    inputs = random_pixels((5, 3, LOW, LOW), seed=3)
    for n, image in enumerate(util.to_uint8(inputs), start=1):
        Image.fromarray(image.numpy()).save(small / f"{n}.png")
    sample.main([str(superres_run / "run" / "ckpt.pt"), "--low_res", str(small), "--steps", "10",
                 "--batch_size", "2", "--out", str(tmp_path / "out")])
    written = sorted(int(p.stem) for p in util.numbered_pngs(tmp_path / "out"))
    assert written == [1, 2, 3, 4, 5]  # one per input, the last batch's spare row dropped
    expected = util.to_uint8(bilinear_by_hand(inputs, SIZE)).int()  # (5, 16, 16, 3)
    for n in written:
        output = torch.from_numpy(np.array(Image.open(tmp_path / "out" / f"{n}.png"))).int()
        assert (output - expected[n - 1]).abs().max() <= 1, f"{n}.png is not the enlarged small/{n}.png"


def test_sample_and_eval_on_the_real_checkpoint(superres_run, tmp_path, capsys):
    ckpt = str(superres_run / "run" / "ckpt.pt")
    sample.main([ckpt, "--low_res", str(superres_run / "small"), "--steps", "4", "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in util.numbered_pngs(tmp_path / "out")) == [f"{n}.png" for n in range(1, 6)]
    assert Image.open(tmp_path / "out" / "5.png").size == (SIZE, SIZE)
    evaluate.main([ckpt, "--steps", "4", "--out", str(tmp_path / "eval"),
                   "--data_dir", str(superres_run / "images")])
    # superres.png: 4 columns (low-res, bicubic, model, original) of the 5 images, enlarged 4x, under a label row
    cell = SIZE + 2
    assert Image.open(tmp_path / "eval" / "superres.png").size == (4 * (2 + 4 * cell), 18 + 4 * (2 + 5 * cell))
    printed = capsys.readouterr().out
    assert "PSNR against the originals, mean over 5 images" in printed and "bicubic" in printed


def test_eval_nll_of_a_super_resolution_model_is_conditioned_on_each_image_shrunk(superres_run, tmp_path):
    """-log p(x0 | x0 shrunk to 4x4): each image's own low-resolution version, as in training."""
    ckpt = with_live_weights(superres_run / "run" / "ckpt.pt", tmp_path / "live.pt")
    images = str(superres_run / "images")
    written = nll_csv_vb(ckpt, images, tmp_path)
    own = bound_by_hand(ckpt, images, lambda x0, model: {"low_res": util.downsample(x0, LOW)})
    others = bound_by_hand(ckpt, images, lambda x0, model: {"low_res": util.downsample(x0.flip(0), LOW)})
    assert torch.allclose(written, own, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(written, others, rtol=1e-3)  # the condition matters: the check could fail


def test_psnr_by_hand():
    reference = random_pixels((2, 3, 8, 8), seed=4).clamp(-1, 1 - 10 / 127.5)
    off_by_5 = reference + 5 / 127.5  # every pixel 5 levels brighter: MSE 25
    assert torch.allclose(evaluate.psnr(off_by_5, reference), torch.full((2,), 10 * math.log10(255 ** 2 / 25)))
    assert torch.isinf(evaluate.psnr(reference, reference)).all()


def test_bad_super_resolution_inputs_are_refused_in_one_line(superres_run, tmp_path):
    ckpt, images = superres_run / "run" / "ckpt.pt", superres_run / "images"
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for n in (1, 2):
        Image.new("RGB", (8, 8)).save(wrong / f"{n}.png")
    plain = tmp_path / "plain"
    train.main(["--data_dir", str(images), "--out_dir", str(plain), *TINY, "--max_steps", "0"])
    lines = fail_lines(
        ("sample.py", ckpt), ("sample.py", ckpt, "--low_res", wrong),
        ("train.py", "--data_dir", images, "--out_dir", tmp_path / "r1", *TINY, "--super_res_from", "16"),
        ("train.py", "--data_dir", images, "--out_dir", tmp_path / "r2", *TINY, "--super_res_from", "4",
         "--class_cond"),
        ("sample.py", plain / "ckpt.pt", "--low_res", superres_run / "small"),
        ("eval.py", plain / "ckpt.pt", "--data_dir", images))
    assert "is a super-resolution model (4x4 -> 16x16): pass --low_res DIR" in lines[0]
    assert "1.png is 8x8, but this model enlarges 4x4 images" in lines[1] and "--size 4" in lines[1]
    assert "--super_res_from 16 must be between 1 and --image_size - 1 = 15" in lines[2]
    assert "not supported" in lines[3]
    assert "--low_res needs a super-resolution model" in lines[4]
    assert "--data_dir is for super-resolution models" in lines[5]

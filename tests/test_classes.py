"""Class-conditional models: labels.txt, label dropout, classifier-free guidance, and the scripts end to end."""
import importlib
import os
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402
from diffusion import GaussianDiffusion, classifier_free_guidance, drop_labels  # noqa: E402
from test_sample_eval import bound_by_hand, fail_lines, nll_csv_vb, with_live_weights  # noqa: E402

evaluate = importlib.import_module("eval")  # the script eval.py; the name `eval` is Python's built-in

TINY = ["--image_size", "16", "--base_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
        "--attention_resolutions", "8", "--num_heads", "2", "--num_timesteps", "20", "--batch_size", "4",
        "--num_workers", "0", "--num_samples", "4", "--log_every", "1000", "--sample_every", "0"]
COLOURS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (255, 0, 0)}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """SRC/red/..., SRC/blue/..., SRC/green/... prepared with --labels, and a class-conditional run on it."""
    base = tmp_path_factory.mktemp("classes")
    for name, colour in COLOURS.items():
        (base / "src" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), tuple(max(0, c - 40 * i) for c in colour)).save(base / "src" / name / f"{i}.png")
    util.prepare([base / "src"], base / "data", size=16, min_size=16, labels=True)
    train.main(["--data_dir", str(base / "data"), "--out_dir", str(base / "run"), *TINY, "--max_steps", "3",
                "--class_cond"])
    return base


def test_label_dropout_replaces_labels_with_the_null_label_with_probability_p():
    torch.manual_seed(0)
    y = torch.arange(1000) % 5
    assert torch.equal(drop_labels(y, 1.0, 5), torch.full_like(y, 5))
    assert torch.equal(drop_labels(y, 0.0, 5), y)
    dropped = drop_labels(y, 0.25, 5)
    kept = dropped != 5
    assert torch.equal(dropped[kept], y[kept])  # a label is kept as it is, or becomes the null label
    assert 0.20 < (~kept).float().mean() < 0.30


def stub_model(x_t, t, y):
    """eps = y + 1 (so conditional and null outputs differ), v = 10 y: easy to tell apart."""
    y = y.float()[:, None, None, None]
    return torch.cat([(y + 1).expand_as(x_t), (10 * y).expand_as(x_t)], dim=1)


def test_guided_eps_is_the_formula_and_v_stays_conditional():
    x, t, y = torch.zeros(3, 2, 4, 4), torch.tensor([0, 5, 9]), torch.tensor([0, 1, 2])
    null = 3
    for w in (0.5, 1.0, 3.0):
        out = classifier_free_guidance(stub_model, w, null)(x, t, y)
        eps_conditional, eps_null = (y + 1).float(), float(null + 1)
        expected_eps = (1 + w) * eps_conditional - w * eps_null  # Ho & Salimans eq. 6
        assert torch.allclose(out[:, :2], expected_eps[:, None, None, None].expand(3, 2, 4, 4))
        assert torch.equal(out[:, 2:], stub_model(x, t, y)[:, 2:])  # the conditional model's v


def test_guidance_zero_is_plain_conditional_sampling_bit_for_bit():
    diffusion = GaussianDiffusion(20, "cosine")
    torch.manual_seed(0)
    model = torch.nn.Conv2d(2, 4, 1)
    conditional = lambda x_t, t, y: model(x_t) + y.float()[:, None, None, None]  # noqa: E731
    assert classifier_free_guidance(conditional, 0, null_label=3) is conditional
    kwargs = dict(steps=10, model_kwargs={"y": torch.tensor([0, 2])}, device="cpu")
    plain = diffusion.sample(conditional, (2, 2, 4, 4), generator=torch.Generator().manual_seed(1), **kwargs)
    guided = diffusion.sample(classifier_free_guidance(conditional, 0, 3), (2, 2, 4, 4),
                              generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(plain, guided)
    other = diffusion.sample(classifier_free_guidance(conditional, 2, 3), (2, 2, 4, 4),
                             generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.equal(plain, other)


def test_prepared_labels_reach_the_checkpoint_and_the_dataset(labelled):
    assert (labelled / "data" / "labels.txt").read_text().splitlines() == ["blue"] * 2 + ["green"] * 2 + ["red"] * 2
    dataset = util.NumberedImages(str(labelled / "data"), 16, labels=True, mirror=True)
    assert dataset.classes == ["blue", "green", "red"]
    x, y = dataset[2]  # 3.png: green
    assert y == 1 and x[1].mean() > 0.5 and x[0].mean() < -0.9
    assert dataset[6 + 2][1] == 1  # the mirrored copy keeps its class
    config = util.load_checkpoint(labelled / "run" / "ckpt.pt")["config"]
    assert config["class_cond"] and config["classes"] == ["blue", "green", "red"]
    model, _ = util.build_model_and_diffusion(config)
    assert model.label_embed.num_embeddings == 3 + 1  # the classes and the null label


def test_sample_writes_the_requested_classes_and_their_labels(labelled, tmp_path):
    ckpt = str(labelled / "run" / "ckpt.pt")
    sample.main([ckpt, "--num", "5", "--batch_size", "2", "--steps", "5", "--out", str(tmp_path / "turn")])
    assert (tmp_path / "turn" / "labels.txt").read_text().splitlines() == ["blue", "green", "red", "blue", "green"]
    sample.main([ckpt, "--num", "3", "--batch_size", "2", "--steps", "5", "--class", "red", "--guidance", "2",
                 "--out", str(tmp_path / "red")])
    assert (tmp_path / "red" / "labels.txt").read_text().splitlines() == ["red"] * 3
    assert len([name for name in os.listdir(tmp_path / "red") if name.endswith(".png")]) == 3


def test_eval_grid_rows_and_guidance_columns(labelled, tmp_path):
    evaluate.main([str(labelled / "run" / "ckpt.pt"), "--steps", "4", "--out", str(tmp_path)])
    cell = 16 + 2
    # grid.png: 4 x 4, enlarged 4x so that each row's class name fits beside it (rows blue, green, red, blue)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height == 4 * (2 + 4 * cell) and grid.width > 4 * (2 + 4 * cell) + 20
    # guidance.png: w = 0, 1, 3, 5, a row for each of the 3 classes, enlarged 4x, an 18 px label row, class names
    guidance = Image.open(tmp_path / "guidance.png")
    assert guidance.height == 18 + 4 * (2 + 3 * cell) and guidance.width == grid.width  # the same labels' width


def test_eval_nll_of_a_class_conditional_model_is_the_bound_under_the_null_label(labelled, tmp_path):
    """-log p(x0) of the model with no class given: the null label that label dropout trained, not a real class."""
    ckpt = with_live_weights(labelled / "run" / "ckpt.pt", tmp_path / "live.pt")
    images = str(labelled / "data")
    written = nll_csv_vb(ckpt, images, tmp_path)
    null = bound_by_hand(ckpt, images, lambda x0, model: {"y": torch.full((len(x0),), model.num_classes)})
    blue = bound_by_hand(ckpt, images, lambda x0, model: {"y": torch.zeros(len(x0), dtype=torch.long)})
    assert torch.allclose(written, null, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(written, blue, rtol=1e-3)  # the label matters: the check could fail


def test_bad_labels_and_classes_are_refused_in_one_line(labelled, tmp_path):
    unlabelled, mislabelled = tmp_path / "unlabelled", tmp_path / "mislabelled"
    for data in (unlabelled, mislabelled):
        data.mkdir()
        for n in (1, 2, 3):
            Image.new("RGB", (16, 16)).save(data / f"{n}.png")
    (mislabelled / "labels.txt").write_text("red\nblue\n")
    no_labels, bad_labels, bad_class = fail_lines(
        ("train.py", "--data_dir", unlabelled, "--out_dir", tmp_path / "run1", "--class_cond"),
        ("train.py", "--data_dir", mislabelled, "--out_dir", tmp_path / "run2", "--class_cond"),
        ("sample.py", labelled / "run" / "ckpt.pt", "--class", "purple"))
    assert "labels.txt does not exist" in no_labels and "util.py prepare" in no_labels
    assert "labels.txt has 2 lines for the 3 images" in bad_labels
    assert "--class purple is not a class of this model; it knows blue, green, red" in bad_class

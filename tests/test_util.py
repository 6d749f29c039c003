import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # util.py lives in the repo root, one level up
import util  # noqa: E402

# data/emoji.py, the bundled data's builder, loaded from its file: "emoji" alone could be an installed package
_spec = importlib.util.spec_from_file_location("emoji_builder", ROOT / "data" / "emoji.py")
emoji_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emoji_builder)

WHITE, RED = (255, 255, 255), (255, 0, 0)
NOTO = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"


def numbers_of(folder):
    """The N of every N.png in folder, sorted."""
    return sorted(int(p.stem) for p in Path(folder).glob("*.png"))


def colors(img):
    """The set of distinct pixel values in img."""
    return {color for count, color in img.getcolors()}


def half_transparent(size=(40, 40)):
    """RGBA: left half fully transparent *black*, right half opaque red."""
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


# --------------------------------------------------------------------------- prepare


def make_sources(tmp_path):
    src1, src2 = tmp_path / "src1", tmp_path / "src2"
    (src2 / "nested").mkdir(parents=True)
    src1.mkdir(exist_ok=True)
    Image.new("RGB", (120, 80), (0, 0, 255)).save(src1 / "photo.jpg")  # non-square
    half_transparent((60, 60)).save(src1 / "rgba.png")
    Image.new("L", (50, 50), 128).save(src1 / "gray.png")
    Image.new("RGB", (20, 40), (0, 255, 0)).save(src1 / "tiny.png")  # short side 20 < min_size
    (src1 / "x.png").write_bytes(b"this is not a png at all")
    (src1 / "notes.txt").write_text("not an image")
    palette = Image.new("P", (48, 48), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0  # palette index 0 is transparent: the whole image
    palette.save(src2 / "nested" / "palette.png")
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(src2 / "cmyk.jpg")
    return src1, src2


def test_prepare_cli_merges_sources_into_numbered_rgb_squares(tmp_path):
    src1, src2 = make_sources(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "util.py"), "prepare", str(src1), str(src2),
           "--out", str(out), "--size", "16", "--min_size", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr

    # src1 sorted: gray, photo, rgba (tiny, x skipped; notes.txt ignored); then src2 sorted: cmyk, nested/palette
    assert numbers_of(out) == [1, 2, 3, 4, 5]
    for n in range(1, 6):
        img = Image.open(out / f"{n}.png")
        assert img.mode == "RGB" and img.size == (16, 16)
    assert Image.open(out / "1.png").getpixel((8, 8)) == (128, 128, 128)
    rgba = Image.open(out / "3.png")
    assert rgba.getpixel((0, 8)) == WHITE  # transparent black became white
    assert rgba.getpixel((15, 8)) == RED
    assert Image.open(out / "5.png").getpixel((8, 8)) == WHITE  # transparent palette image

    assert re.search(r"skip .*tiny\.png: 20x40 is smaller than --min_size 32", log)
    assert re.search(r"skip .*x\.png: cannot read it as an image", log)
    assert "ignored 1 files" in log
    assert "wrote 5 images" in log and "skipped 2" in log


def test_prepare_refuses_to_mix_datasets_unless_overwrite(tmp_path):
    src1, src2 = make_sources(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for n in range(1, 10):  # an older, bigger dataset
        Image.new("RGB", (8, 8)).save(out / f"{n}.png")

    with pytest.raises(SystemExit, match="--overwrite"):
        util.prepare([src1], out, size=8, min_size=32)
    assert numbers_of(out) == list(range(1, 10))  # untouched

    assert util.prepare([src1, src2], out, size=8, min_size=32, overwrite=True) == 5
    assert numbers_of(out) == [1, 2, 3, 4, 5]  # no stale 6.png ... 9.png left behind


def test_prepare_labels_name_each_image_by_its_first_level_sub_folder(tmp_path):
    src = tmp_path / "src"
    for path, colour, side in [("red_hair/a.png", RED, 40), ("red_hair/b.png", RED, 40),
                               ("blue_hair/c.png", (0, 0, 255), 40), ("blue_hair/deeper/d.png", (0, 0, 200), 40),
                               ("blue_hair/tiny.png", (0, 0, 255), 8)]:  # tiny: skipped, so no label either
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), colour).save(src / path)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "util.py"), "prepare", str(src), "--out", str(out), "--size", "16",
           "--min_size", "32", "--labels"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # sorted: blue_hair/c, blue_hair/deeper/d, (blue_hair/tiny skipped), red_hair/a, red_hair/b
    assert (out / "labels.txt").read_text() == "blue_hair\nblue_hair\nred_hair\nred_hair\n"
    assert [Image.open(out / f"{n}.png").getpixel((8, 8)) for n in (1, 2, 3, 4)] == [
        (0, 0, 255), (0, 0, 200), RED, RED]
    assert "2 classes: blue_hair 2, red_hair 2" in result.stdout

    (src / "loose.png").write_bytes((src / "red_hair" / "a.png").read_bytes())  # in no sub-folder: no class
    with pytest.raises(SystemExit, match=r"loose\.png is not in a sub-folder of .*src"):
        util.prepare([src], out, size=16, min_size=32, overwrite=True, labels=True)
    assert numbers_of(out) == [1, 2, 3, 4] and (out / "labels.txt").exists()  # refused before touching out
    util.prepare([src], out, size=16, min_size=32, overwrite=True)  # unlabelled now: no stale labels.txt
    assert numbers_of(out) == [1, 2, 3, 4, 5] and not (out / "labels.txt").exists()


# --------------------------------------------------------------------------- to_rgb, center_crop_resize


@pytest.mark.parametrize("img", [
    Image.new("L", (30, 20), 77),
    Image.new("LA", (20, 30), (77, 255)),
    Image.new("RGBA", (25, 25), (10, 20, 30, 255)),
    Image.new("P", (40, 10), 3),
    Image.new("CMYK", (12, 12), (0, 0, 0, 0)),
    Image.new("I;16", (20, 20), 65535),
], ids=lambda img: img.mode)
def test_any_mode_comes_out_rgb_and_square(img):
    out = util.center_crop_resize(util.to_rgb(img), 16)
    assert out.mode == "RGB" and out.size == (16, 16)


def test_to_rgb_puts_transparency_on_white():
    assert colors(util.to_rgb(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))) == {WHITE}
    assert colors(util.to_rgb(Image.new("LA", (8, 8), (0, 0)))) == {WHITE}
    half = util.to_rgb(Image.new("RGBA", (8, 8), (0, 0, 0, 128)))  # 50% black over white: mid gray
    assert half.getpixel((0, 0)) == (127, 127, 127)
    gray16 = util.to_rgb(Image.new("I;16", (4, 4), 32768))  # 16-bit half intensity, not clipped to white
    assert gray16.getpixel((0, 0)) == (128, 128, 128)


def test_center_crop_keeps_the_middle():
    img = Image.new("RGB", (60, 20), (0, 0, 255))  # blue bands left and right of a red centre square
    img.paste(RED, (20, 0, 40, 20))
    out = util.center_crop_resize(img, 10)
    assert out.size == (10, 10) and colors(out) == {RED}
    same = Image.new("RGB", (10, 10), RED)
    assert util.center_crop_resize(same, 10) is same  # nothing to do


# --------------------------------------------------------------------------- checkpoints


def test_save_checkpoint_roundtrip_and_no_tmp_left(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    ckpt = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "config": {"size": 32, "lr": 1e-4}, "step": 7}
    util.save_checkpoint(ckpt, path)
    loaded = util.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], ckpt["model"]["w"])
    assert loaded["config"] == {"size": 32, "lr": 1e-4} and loaded["step"] == 7
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    util.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(util.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        util.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()

    old = util.load_checkpoint(path)
    assert old["step"] == 1 and torch.equal(old["w"], torch.ones(3))


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    util.save_checkpoint({"step": 1}, path)

    def write_half_then_crash(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(util.torch, "save", write_half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        util.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert util.load_checkpoint(path)["step"] == 1


class WritesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"), which creates the file
        return (open, (str(self.marker), "w"))


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": WritesAFileWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match=r"refused to load .*evil\.pt.*not a checkpoint made by this project"):
        util.load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        util.load_checkpoint(tmp_path / "nope.pt")


# --------------------------------------------------------------------------- images, seeds, devices


def test_save_image_grid_size_and_value_mapping(tmp_path):
    x = torch.zeros(6, 3, 8, 8)
    x[0] = -1.0
    x[1] = 1.0
    x[2] = 5.0  # out of range: clamped to white
    path = tmp_path / "new_dir" / "grid.png"
    util.save_image_grid(x, path)  # nrow = ceil(sqrt(6)) = 3 -> 3 columns, 2 rows, 2 px padding
    grid = Image.open(path)
    assert grid.mode == "RGB" and grid.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)
    assert grid.getpixel((2 + 4, 2 + 4)) == (0, 0, 0)  # image 0: -1 -> 0
    assert grid.getpixel((12 + 4, 2 + 4)) == WHITE  # image 1: 1 -> 255
    assert grid.getpixel((22 + 4, 2 + 4)) == WHITE  # image 2: clamped
    assert grid.getpixel((2 + 4, 12 + 4)) == (128, 128, 128)  # image 3: 0 -> mid gray

    util.save_image_grid(x, path, nrow=6)
    assert Image.open(path).size == (6 * 10 + 2, 1 * 10 + 2)


def dark_pixels(image, box):
    return int((np.array(image.crop(box).convert("L")) < 128).sum())


def test_labelled_grid_puts_the_images_beside_their_labels():
    x = torch.ones(6, 3, 16, 16)  # white images: any dark pixel is a label's
    x[:, 0] = -1  # cyan, so that images and background differ
    plain = util.image_grid(x, nrow=3).resize((4 * 56, 4 * 38), Image.NEAREST)  # 3 x 2 images, enlarged 4x to 64 px
    columns = util.labelled_grid(x, 3, column_labels=["K=10", "K=25", "T=50"])
    assert columns.size == (plain.width, 18 + plain.height)
    assert np.array_equal(np.array(columns)[18:], np.array(plain))  # the images under an 18 px band
    for column in range(3):  # each label over its own column: left edge 8 px, then 72 px a column
        assert dark_pixels(columns, (8 + 72 * column, 0, 8 + 72 * column + 64, 18)) > 10
    below = util.labelled_grid(x, 3, column_labels=["t=50", "t=25", "t=1"], labels_below=True)
    assert np.array_equal(np.array(below)[:plain.height], np.array(plain))
    assert dark_pixels(below, (0, plain.height, below.width, below.height)) > 30
    rows = util.labelled_grid(x, 3, row_labels=["smiley", "animal"])
    left = rows.width - plain.width
    assert left > 30 and rows.height == plain.height  # room for the longest name, "animal" or "smiley"
    assert np.array_equal(np.array(rows)[:, left:], np.array(plain))
    for row in range(2):
        assert dark_pixels(rows, (0, 8 + 72 * row, left, 8 + 72 * row + 64)) > 10
    assert dark_pixels(rows, (0, 0, left, 8)) == 0


def test_pick_device_gives_cuda_an_index(fake_gpu, monkeypatch):
    assert util.pick_device("cpu") == torch.device("cpu")
    fake_gpu(count=2)
    assert util.pick_device() == torch.device("cuda:0")  # one process: set_device and the random stream need an index
    assert util.pick_device("cuda") == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert util.pick_device("auto") == torch.device("cuda:1")  # torchrun: one GPU per process
    assert util.pick_device("cuda") == torch.device("cuda:1")  # plain cuda too, or every rank would be on GPU 0
    assert util.pick_device("cuda:0") == torch.device("cuda:0")  # a GPU named by number is taken as named
    assert util.pick_device("cpu") == torch.device("cpu")
    for wrong, words in (("cuda:2", "torch sees 2 CUDA GPUs"), ("gpu", "is not a device")):
        with pytest.raises(SystemExit, match=words):
            util.pick_device(wrong)


@pytest.mark.parametrize("avx512_bf16, amx, native", [(False, False, False), (True, False, True),
                                                      (False, True, True)])
def test_autocast_dtype_on_the_cpu_is_bf16_only_where_it_is_native(monkeypatch, capsys, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert util.native_bf16(cpu) is native
    assert util.autocast_dtype(cpu, "fp32") is None
    assert util.autocast_dtype(cpu, "auto") is (torch.bfloat16 if native else None)  # emulated bf16: 20x slower
    assert capsys.readouterr().err == ""
    assert util.autocast_dtype(cpu, "bf16") is torch.bfloat16  # asked for: given, with a warning where emulated
    warning = capsys.readouterr().err
    assert ("no native bf16" in warning and "--precision fp32" in warning) is not native
    assert util.autocast_dtype(cpu, "fp16") is torch.float16  # the GPU path of older cards, rehearsed on the CPU
    note = capsys.readouterr().err
    assert "rehearses" in note and len(note.splitlines()) == 1


# --------------------------------------------------------------------------- the bundled emoji data


def test_bundled_emoji_are_contiguous_32px_rgb_with_a_5_percent_test_split():
    train, test = numbers_of(ROOT / "data/emoji"), numbers_of(ROOT / "data/emoji_test")
    assert 300 <= len(train) <= 1600 and train == list(range(1, len(train) + 1))
    assert test == list(range(1, len(test) + 1))
    assert abs(len(test) - 0.05 * (len(train) + len(test))) <= 1
    for folder, numbers in [("emoji", train), ("emoji_test", test)]:
        for n in numbers:
            img = Image.open(ROOT / "data" / folder / f"{n}.png")
            assert img.mode == "RGB" and img.size == (32, 32), f"data/{folder}/{n}.png"
            assert img.getpixel((0, 0)) == WHITE or img.getpixel((31, 31)) == WHITE  # on white, padded square
        labels = (ROOT / "data" / folder / "labels.txt").read_text().splitlines()  # line n: the class of n.png
        assert len(labels) == len(numbers) and set(labels) == {"smiley", "person", "animal"}
    labels = (ROOT / "data/emoji/labels.txt").read_text().splitlines()
    # 1-3.png: skull and crossbones, frowning face, smiling face; 4.png: Santa; 10.png: koala (looked at)
    assert labels[:4] == ["smiley", "smiley", "smiley", "person"] and labels[9] == "animal"


def test_skin_tone_goes_after_the_base_and_replaces_vs16():
    e = emoji_builder
    detective_man = (0x1F575, e.VS16, e.ZWJ, e.MALE, e.VS16)
    assert e.with_skin_tone(detective_man, 0x1F3FB) == (0x1F575, 0x1F3FB, e.ZWJ, e.MALE, e.VS16)
    assert e.with_skin_tone((0x1F476,), 0x1F3FF) == (0x1F476, 0x1F3FF)
    sequences = e.emoji_sequences()
    assert sequences == sorted(set(sequences))  # sorted, no duplicates: a stable numbering
    groups = e.emoji_groups()
    assert sum(len(set(group)) for group in groups.values()) == len(sequences)  # every emoji in exactly one class
    assert (0x1F600,) in groups["smiley"] and (0x1F436,) in groups["animal"] and (0x1F476, 0x1F3FF) in groups["person"]


@pytest.mark.skipif(not os.path.exists(NOTO), reason="needs fonts-noto-color-emoji")
def test_regenerating_the_emoji_gives_the_bundled_images(tmp_path):
    emoji_builder.emoji(NOTO, tmp_path / "emoji", size=32, test_fraction=0.05, seed=0)
    for folder in ["emoji", "emoji_test"]:
        bundled = numbers_of(ROOT / "data" / folder)
        assert numbers_of(tmp_path / folder) == bundled
        for n in bundled:
            new = Image.open(tmp_path / folder / f"{n}.png").tobytes()
            assert new == Image.open(ROOT / "data" / folder / f"{n}.png").tobytes(), f"data/{folder}/{n}.png"
        assert (tmp_path / folder / "labels.txt").read_text() == (ROOT / "data" / folder / "labels.txt").read_text()

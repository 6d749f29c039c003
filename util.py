"""
What train.py, sample.py and eval.py share: images, the dataset folder, checkpoints, devices and precision. Plus
one tool you run by hand:

    python util.py prepare ~/Downloads/faces --out data/faces --size 64     # your images -> 1.png ... N.png

A dataset here is a folder of RGB PNGs named 1.png ... N.png, all size x size (data/emoji.py builds the demo's).
"""
import argparse
import math
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from diffusion import GaussianDiffusion
from unet import UNet


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and shows every flag's default."""


# -- Images -------------------------------------------------------------------------------------------------------
def to_rgb(img):
    """Any PIL mode -> RGB. Transparent pixels become white (a plain convert("RGB") would make them black)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: scale to 0..255 first
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return img.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")).convert("RGB")


def center_crop_resize(img, size):
    """Cut the largest centred square, then resize it to size x size (LANCZOS, which antialiases when shrinking)."""
    side = min(img.size)
    if img.width != img.height:  # cropped first: a resize of a box would blend in the pixels around it
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.LANCZOS)


def to_uint8(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 on the CPU, the pixels a PNG stores: -1 -> 0, 1 -> 255."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def image_grid(x, nrow=None):
    """(B, C, H, W) in [-1, 1] -> a PIL image of the B images, nrow a row (default ~square), 2 px white between."""
    images = to_uint8(x)  # (B, H, W, C)
    B, H, W, C = images.shape
    columns = min(B, nrow or math.ceil(math.sqrt(B)))
    rows = math.ceil(B / columns)
    grid = torch.full((2 + rows * (H + 2), 2 + columns * (W + 2), C), 255, dtype=torch.uint8)
    for i, image in enumerate(images):
        top, left = 2 + i // columns * (H + 2), 2 + i % columns * (W + 2)
        grid[top:top + H, left:left + W] = image
    return Image.fromarray(grid.numpy())


def labelled_grid(x, nrow=None, column_labels=(), row_labels=(), labels_below=False, min_side=64):
    """image_grid with a label over each column (under it with labels_below) and one left of each row, so that a
    picture says what it shows. Images are enlarged (nearest: every pixel stays visible) to at least min_side px."""
    grid = image_grid(x, nrow)
    if not column_labels and not row_labels:
        return grid
    scale = max(1, math.ceil(min_side / x.shape[-1]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=12)
    left = round(max(ImageDraw.Draw(grid).textlength(text, font=font) for text in row_labels)) + 8 if row_labels else 0
    header = 18 if column_labels else 0
    top = 0 if labels_below else header  # where the images start
    canvas = Image.new("RGB", (left + grid.width, header + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(column_labels):  # image_grid pads 2 px around every image
        draw.text((left + (2 + column * (x.shape[-1] + 2) + x.shape[-1] / 2) * scale,
                   grid.height + header / 2 if labels_below else header / 2), label, "black", font, anchor="mm")
    for row, label in enumerate(row_labels):
        draw.text((left - 4, top + (2 + row * (x.shape[-2] + 2) + x.shape[-2] / 2) * scale), label, "black", font,
                  anchor="rm")
    return canvas


def save_image_grid(x, path, nrow=None, column_labels=(), row_labels=(), labels_below=False):
    """labelled_grid(x, ...) saved as a PNG at path (its folder made); returns it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid = labelled_grid(x, nrow, column_labels, row_labels, labels_below)
    grid.save(path)
    return grid


def downsample(x, size):
    """(B, C, H, W) in [-1, 1] -> (B, C, size, size), box-filtered and rounded to 8 bits as PNGs hold it (--low_res)."""
    return ((F.interpolate(x, size=(size, size), mode="area") + 1) * 127.5).round() / 127.5 - 1


# -- The dataset folder: 1.png ... N.png --------------------------------------------------------------------------
def numbered_pngs(folder):
    return [p for p in Path(folder).glob("*.png") if re.fullmatch(r"\d+\.png", p.name)]


def read_labels(folder, count):
    """folder/labels.txt, line n the class of n.png -> (sorted class names, each image's index into them)."""
    path = os.path.join(folder, "labels.txt")
    fix = f"make it with: python util.py prepare SRC --out {folder} --labels (images in SRC/CLASS/)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a class-conditional model needs every image's class; {fix}")
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    if len(names) != count:
        raise ValueError(f"{path} has {len(names)} lines for the {count} images of {folder}: line n must be the "
                         f"class of n.png; {fix}")
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is empty, so {names.index('') + 1}.png has no class")
    classes = sorted(set(names))
    return classes, [classes.index(name) for name in names]


class NumberedImages(torch.utils.data.Dataset):
    """1.png ... N.png as (3, size, size) tensors in [-1, 1] (labels=True: and class indices). mirror=True adds
    N..2N-1, the same flipped: the random flip, picked by train.py's seeded sampler: a resume sees the same batches."""

    def __init__(self, folder, image_size, labels=False, mirror=False):
        fix = f"make one with: python util.py prepare YOUR_IMAGES --out {folder} --size {image_size}"
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data folder {folder!r} does not exist; {fix}")
        numbers = sorted(int(path.stem) for path in numbered_pngs(folder))
        if not numbers:
            raise FileNotFoundError(f"no numbered PNGs (1.png, 2.png, ...) in {folder!r}; {fix}")
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        if missing:
            raise FileNotFoundError(f"{os.path.join(folder, f'{missing[0]}.png')} is missing ({len(missing)} of 1.."
                                    f"{numbers[-1]}.png are): the images must be numbered without gaps; renumber them "
                                    f"with: util.py prepare {folder} --out {folder}_renumbered --size {image_size}")
        self.paths = [os.path.join(folder, f"{n}.png") for n in numbers]
        self.image_size = image_size
        self.mirror = mirror
        self.reported = set()  # the unreadable files already warned of
        self.classes, self.labels = read_labels(folder, len(self.paths)) if labels else (None, None)

    def __len__(self):
        return 2 * len(self.paths) if self.mirror else len(self.paths)

    def __getitem__(self, index):
        mirrored = index >= len(self.paths)  # N..2N-1: the images flipped left-right
        for attempt in range(len(self.paths)):  # a corrupt file must not kill a run: said once, the next one used
            chosen = (index + attempt) % len(self.paths)
            path = self.paths[chosen]
            try:
                with Image.open(path) as img:
                    img = center_crop_resize(to_rgb(img), self.image_size)
                break
            except Exception as error:
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"warning: skipping unreadable image {path}: {error}", file=sys.stderr)
        else:
            raise RuntimeError(f"no readable image among the {len(self.paths)} PNGs of {os.path.dirname(path)}")
        if mirrored:
            img = ImageOps.mirror(img)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1  # (3, size, size), 0..255 -> [-1, 1]
        return x if self.labels is None else (x, self.labels[chosen])


def prepare(srcs, out, size, min_size=None, overwrite=False, labels=False):
    """Merge folders of images into out/1.png ... N.png, RGB, centre-cropped to size x size, skipping those with a
    side below min_size (None: size); returns N. labels: out/labels.txt, each image's sub-folder (SRC/CLASS/x.png)."""
    min_size = size if min_size is None else min_size
    extensions = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    files, ignored = [], 0  # (path, its first-level sub-folder: the class with --labels)
    for src in srcs:  # SRC folders in the order given, each one's files (sub-folders included) sorted
        if not Path(src).is_dir() or Path(src).resolve() == Path(out).resolve():
            raise SystemExit(f"error: SRC {src} must be a folder of images, and not --out {out}")
        for p in sorted(Path(src).rglob("*")):
            if p.is_file() and p.suffix.lower() in extensions:
                parts = p.relative_to(src).parts
                if labels and len(parts) == 1:
                    raise SystemExit(f"error: {p} is not in a sub-folder of {src}: with --labels the sub-folder an "
                                     f"image is in names its class; move it into one (e.g. {src}/CLASS/)")
                files.append((p, parts[0]))
            elif p.is_file():
                ignored += 1
    old = numbered_pngs(out)  # they would mix two datasets
    if old and not overwrite:
        raise SystemExit(f"error: {out} already holds {len(old)} numbered PNGs (1.png, 2.png, ...) from an earlier "
                         f"run; pass --overwrite to delete them first, or pick another --out")
    for p in [*old, Path(out) / "labels.txt"]:
        p.unlink(missing_ok=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    if ignored:
        print(f"ignored {ignored} files whose names do not end in {' '.join(sorted(extensions))}")
    written = []  # each written image's class
    for p, name in tqdm(files, desc="prepare", unit="img"):
        try:
            with Image.open(p) as img:
                img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF; read in full
        except Exception as e:
            tqdm.write(f"skip {p}: cannot read it as an image ({e})")
            continue
        if min(img.size) < min_size:
            tqdm.write(f"skip {p}: {img.width}x{img.height} is smaller than --min_size {min_size} on its short side")
            continue
        written.append(name)
        center_crop_resize(to_rgb(img), size).save(Path(out) / f"{len(written)}.png")
    print(f"wrote {len(written)} images ({size}x{size} RGB) to {out}; skipped {len(files) - len(written)}")
    if labels:
        Path(out, "labels.txt").write_text("".join(f"{name}\n" for name in written))
        classes = sorted(set(written))
        print(f"wrote labels.txt, {len(classes)} classes: " + ", ".join(f"{c} {written.count(c)}" for c in classes))
    return len(written)


# -- Checkpoints: one self-describing file, written atomically, checked when read ---------------------------------
def previous_checkpoint(path):
    """OUT/ckpt.prev.pt for OUT/ckpt.pt: the one save_checkpoint replaced last, for when the newest is damaged."""
    root, extension = os.path.splitext(os.fspath(path))
    return root + ".prev" + extension


def save_checkpoint(obj, path):
    """torch.save to path.tmp, fsynced, then path -> ckpt.prev.pt and path.tmp -> path: atomic renames, kill -9 safe."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, previous_checkpoint(path))
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """A checkpoint dict on the CPU, or a one-line FileNotFoundError or ValueError. torch.save's zip archive keeps the
    CRC-32 of every record, which torch.load does not check: zipfile's testzip does. weights_only: no pickled code."""
    path, previous = os.fspath(path), previous_checkpoint(path)
    use_previous = f"; {previous}, the checkpoint saved before it, may be intact" if os.path.isfile(previous) else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path, or train one{use_previous}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # the first record whose bytes do not match their CRC-32, or None
        if damaged is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a damaged file can make torch warn before it fails: one line
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"refused to load {path} ({type(error).__name__}): {os.path.basename(path)} is not a "
                         f"checkpoint made by this project's train.py, or it is damaged or truncated (only tensors and "
                         f"plain values are read, never pickled objects, which could run code){use_previous}") from None
    if damaged:
        raise ValueError(f"{path} is damaged: its contents do not match the checksum saved with them (the CRC-32 of "
                         f"{ascii(damaged)}), so it was not loaded{use_previous}")
    checkpoint.pop("checksum", None)  # what earlier versions stored beside the contents
    return checkpoint


def resume_checkpoint(out_dir, rank):
    """OUT/ckpt.pt's dict, or ckpt.prev.pt's when it is missing or damaged; None for a new run; else one line."""
    path = os.path.join(out_dir, "ckpt.pt")
    previous = previous_checkpoint(path)
    try:
        return load_checkpoint(path) if os.path.exists(path) or os.path.exists(previous) else None
    except (FileNotFoundError, ValueError) as error:
        if not os.path.exists(previous):
            raise SystemExit(f"error: {error}; move it away to start a new run in {out_dir}") from None
    problem = "is damaged or unreadable" if os.path.exists(path) else "is missing"  # or a kill between two renames
    try:
        checkpoint = load_checkpoint(previous)
    except ValueError as error:
        raise SystemExit(f"error: {path} {problem}, and {previous}, the checkpoint saved before it, cannot be resumed "
                         f"from either ({error}); neither was changed: copy a good checkpoint to {path} to resume, or "
                         f"move both away to start a new run in {out_dir}") from None
    kept = f" (the damaged file is kept as {path}.damaged)" if os.path.exists(path) else ""
    if kept and rank == 0:  # moved aside, or the next save would make it ckpt.prev.pt
        os.replace(path, path + ".damaged")
    print(f"{path} {problem}: resuming from {previous}, the checkpoint saved before it, at step "
          f"{checkpoint['step']}{kept}", file=sys.stderr)
    return checkpoint


def build_model_and_diffusion(config):
    """The network and the process a config (train.py's flags, as a checkpoint stores them) describes."""
    classes = config.get("classes")  # the class names of a class-conditional model (train.py --class_cond)
    model = UNet(image_size=config["image_size"], base_channels=config["base_channels"],
                 channel_mult=tuple(config["channel_mult"]), num_res_blocks=config["num_res_blocks"],
                 attention_resolutions=tuple(config["attention_resolutions"]), num_heads=config["num_heads"],
                 dropout=config["dropout"], learn_sigma=config["learn_sigma"],
                 num_classes=len(classes) if classes else None,
                 cond_channels=3 if config.get("super_res_from") else 0,  # super-resolution: the low-res RGB image
                 min_group_channels=config.get("min_group_channels", 1),  # checkpoints from before it: DDPM's rule
                 checkpointing=config.get("checkpointing", False))
    diffusion = GaussianDiffusion(num_timesteps=config["num_timesteps"], noise_schedule=config["noise_schedule"],
                                  learn_sigma=config["learn_sigma"], loss_type=config["loss_type"],
                                  importance_sampling=config["importance_sampling"])
    return model, diffusion


def load_model(path, device="cpu", use_ema=True):
    """(network in eval mode on device with EMA weights unless not use_ema, process, config, step); else one line."""
    checkpoint = load_checkpoint(path)
    try:
        model, diffusion = build_model_and_diffusion(checkpoint["config"])
        model.load_state_dict(checkpoint["ema" if use_ema else "model"])
    except Exception as error:
        raise ValueError(f"the weights in {path} do not fit the model its config describes ({type(error).__name__}): "
                         f"{os.path.basename(path)} is not a checkpoint made by this project's train.py, or comes from "
                         f"another version of it") from None
    model.to(device, memory_format=torch.channels_last).eval()  # NHWC: faster on GPUs, and CPUs (sampling 1.2x)
    return model, diffusion.to(device), checkpoint["config"], checkpoint["step"]


# -- Devices and precision ----------------------------------------------------------------------------------------
def pick_device(name="auto"):
    """--device as a torch.device, with an index on CUDA: set_device and the GPU's random stream need one. auto: CUDA
    if present, else the CPU (not mps: no float64); cuda: cuda:LOCAL_RANK under torchrun, else cuda:0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name} is not a device; try auto, cpu, cuda or cuda:1") from None
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}, but torch sees {torch.cuda.device_count()} CUDA GPUs here")
    return device


def native_bf16(device):
    """Whether device computes bf16 in hardware (GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX), not emulated."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_dtype(device, precision):
    """torch.autocast's dtype for --precision (None: fp32); auto: bf16 where native, else fp16 on a GPU, else fp32."""
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "fp32"
    elif precision == "bf16" and not native_bf16(device):
        print(f"warning: no native bf16 on this {device.type}: emulated, ~20x slower than --precision fp32",
              file=sys.stderr)
    elif precision == "fp16" and device.type == "cpu":
        print("note: fp16 on the CPU rehearses a GPU without bf16, slowly (conv backward ~100x fp32)", file=sys.stderr)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, dtype):
    """torch.autocast to dtype on device's type; changes nothing when dtype is None (fp32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("command", choices=["prepare"], help="make a dataset folder from folders of .jpg/.png/... images")
    p.add_argument("src", nargs="+", metavar="SRC", help="folders of images, read in the order given, files sorted")
    p.add_argument("--out", required=True, help="folder to write 1.png ... N.png into (created if missing)")
    p.add_argument("--size", type=int, default=64, help="side of the square output images, in pixels")
    p.add_argument("--min_size", type=int, default=None, help="skip images with a shorter side (None: --size)")
    p.add_argument("--overwrite", action="store_true", help="delete numbered PNGs already in --out first")
    p.add_argument("--labels", action="store_true", help="also write OUT/labels.txt: each image's sub-folder of SRC")
    args = p.parse_args()
    prepare(args.src, args.out, args.size, args.min_size, args.overwrite, args.labels)

"""
The scripts' toolbox: what train.py, sample.py and eval.py share (images, the dataset folder, building a model
from a checkpoint, devices and precision), plus one tool you run by hand:

    python util.py prepare ~/Downloads/faces --out data/faces --size 64     # your images -> 1.png ... N.png

A dataset here is a folder of RGB PNGs named 1.png ... N.png, all size x size. The bundled demo data is built by
data/emoji.py.
"""

import argparse
import math
import os
import pickle
import random
import re
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from diffusion import GaussianDiffusion
from unet import UNet

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# -----------------------------------------------------------------------------
# command lines


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's line breaks and shows every flag's default."""


# -----------------------------------------------------------------------------
# images


def to_rgb(img):
    """Any PIL mode -> RGB. Transparent pixels become white (a plain convert("RGB") would make them black)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale: scale to 0..255 first
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")  # L, P, CMYK, YCbCr, ... carry no transparency
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def center_crop_resize(img, size):
    """Cut the largest centred square, then resize it to size x size (LANCZOS, which antialiases when shrinking)."""
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.LANCZOS)
    return img


def to_uint8(x):
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8 on the CPU, the pixels a PNG stores: -1 -> 0, 1 -> 255."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_image_grid(x, path, nrow=None, column_labels=(), row_labels=(), labels_below=False):
    """x: (B, C, H, W) in [-1, 1] -> one PNG with the B images in a grid, nrow images per row (default ~square),
    labelled as labelled_grid says if labels are given. Returns the grid, an RGB PIL image."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if column_labels or row_labels:
        grid = labelled_grid(x, nrow, column_labels, row_labels, labels_below)
    else:
        grid = image_grid(x, nrow)
    grid.save(path)
    return grid


def image_grid(x, nrow=None):
    """x: (B, C, H, W) in [-1, 1] -> a PIL image of the B images, nrow per row (default ~square), 2 px white
    between them."""
    if nrow is None:
        nrow = math.ceil(math.sqrt(x.shape[0]))
    pixels = to_uint8(x).permute(0, 3, 1, 2)  # (B, C, H, W) uint8, rounded as the PNGs of sample.py are
    grid = torchvision.utils.make_grid(pixels, nrow=nrow, padding=2, pad_value=255)  # (C, H', W')
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def labelled_grid(x, nrow, column_labels=(), row_labels=(), labels_below=False, min_side=64):
    """image_grid, with a label over each column (under it with labels_below) and one left of each row, so that a
    picture says what it shows. The images are enlarged (nearest neighbour: every pixel stays visible) to at least
    min_side px, so that a label fits over an image."""
    grid = image_grid(x, nrow)
    scale = max(1, math.ceil(min_side / x.shape[-1]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=12)
    text_width = ImageDraw.Draw(grid).textlength
    left = round(max(text_width(label, font=font) for label in row_labels)) + 8 if row_labels else 0
    header = 18 if column_labels else 0
    top = 0 if labels_below else header  # where the images start
    canvas = Image.new("RGB", (left + grid.width, header + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    height, width = x.shape[-2:]

    def centre(index, side):  # of the index-th image along one axis: image_grid pads 2 px around every image
        return (2 + index * (side + 2) + side / 2) * scale

    label_y = grid.height + header / 2 if labels_below else header / 2
    for column, label in enumerate(column_labels):
        draw.text((left + centre(column, width), label_y), label, fill="black", font=font, anchor="mm")
    for row, label in enumerate(row_labels):
        draw.text((left - 4, top + centre(row, height)), label, fill="black", font=font, anchor="rm")
    return canvas


def downsample(x, size):
    """(B, C, H, W) in [-1, 1] -> (B, C, size, size) in [-1, 1], each pixel the mean of the pixels it covers (a box
    filter: it antialiases), then rounded to 8 bits: the low-resolution input of a super-resolution model, made at
    training time as sample.py --low_res reads it from PNG files."""
    x = F.interpolate(x, size=(size, size), mode="area")
    return ((x + 1) * 127.5).round() / 127.5 - 1


def upsample(x, size):
    """(B, C, h, w) -> (B, C, size, size), bilinear: how a super-resolution model sees its low-resolution input,
    at the output's size, so that it can be concatenated to x_t as extra channels (as the reference code does)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# -----------------------------------------------------------------------------
# the dataset folder: 1.png ... N.png


def numbered_pngs(folder):
    return [p for p in Path(folder).glob("*.png") if re.fullmatch(r"\d+\.png", p.name)]


def read_labels(folder, count):
    """folder/labels.txt, line n the class name of n.png -> (classes, labels): the sorted distinct names, and each
    image's index into them. Raises FileNotFoundError or ValueError naming the file and the fix."""
    path = os.path.join(folder, "labels.txt")
    fix = f"make it with: python util.py prepare SRC --out {folder} --labels (images in SRC/CLASS/)"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a class-conditional model needs every image's class; {fix}")
    with open(path) as f:
        names = [line.strip() for line in f.read().splitlines()]
    if len(names) != count:
        raise ValueError(f"{path} has {len(names)} lines for the {count} images of {folder}: line n must be the "
                         f"class of n.png; {fix}")
    if "" in names:
        raise ValueError(f"{path}: line {names.index('') + 1} is empty, so {names.index('') + 1}.png has no class")
    classes = sorted(set(names))
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[name] for name in names]


def write_labels(folder, names):
    """folder/labels.txt from the class names of 1.png, 2.png, ... in order: the file read_labels reads."""
    with open(os.path.join(folder, "labels.txt"), "w") as f:
        f.write("".join(f"{name}\n" for name in names))


class NumberedImages(torch.utils.data.Dataset):
    """1.png ... N.png as (3, size, size) tensors in [-1, 1], or with labels=True as (image, class index) from
    labels.txt. Indices N..2N-1 are the same images mirrored: the random horizontal flip, chosen by train.py's
    seeded sampler so that a resumed run sees the same batches. A missing or empty folder, or a gap in the
    numbering, raises FileNotFoundError naming the file and the fix; a bad labels.txt, ValueError."""

    def __init__(self, folder, image_size, labels=False):
        fix = f"make one with: python util.py prepare YOUR_IMAGES --out {folder} --size {image_size}"
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data folder {folder!r} does not exist; {fix}")
        numbers = sorted(int(path.stem) for path in numbered_pngs(folder))
        if not numbers:
            raise FileNotFoundError(f"no numbered PNGs (1.png, 2.png, ...) in {folder!r}; {fix}")
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        if missing:
            raise FileNotFoundError(
                f"{os.path.join(folder, f'{missing[0]}.png')} is missing "
                f"({len(missing)} of 1..{numbers[-1]}.png are missing): "
                f"the images must be numbered without gaps; renumber them with: "
                f"python util.py prepare {folder} --out {folder}_renumbered --size {image_size}")
        self.paths = [os.path.join(folder, f"{n}.png") for n in numbers]
        self.image_size = image_size
        self.reported = set()
        self.classes, self.labels = read_labels(folder, len(self.paths)) if labels else (None, None)

    def __len__(self):
        return 2 * len(self.paths)

    def __getitem__(self, index):
        # A corrupt file must not kill a long run: report it once and use the next image instead.
        for attempt in range(len(self.paths)):
            chosen = (index + attempt) % len(self.paths)
            path = self.paths[chosen]
            try:
                with Image.open(path) as img:
                    img = center_crop_resize(to_rgb(img), self.image_size)
                break
            except (OSError, ValueError, SyntaxError) as error:
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"warning: skipping unreadable image {path}: {error}", file=sys.stderr)
        else:
            raise RuntimeError(f"no readable image among the {len(self.paths)} files of {os.path.dirname(path)}")
        if index >= len(self.paths):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = pil_to_tensor(img).float() / 127.5 - 1  # (3, size, size), uint8 0..255 -> [-1, 1]
        return x if self.labels is None else (x, self.labels[chosen])


def clear_output_folder(out, overwrite):
    """Make out an empty place for 1.png ... N.png (and labels.txt); old ones would mix two datasets."""
    old = numbered_pngs(out)
    if old and not overwrite:
        raise SystemExit(
            f"error: {out} already holds {len(old)} numbered PNGs (1.png, 2.png, ...) from an earlier run; "
            f"writing there would mix two datasets. Pass --overwrite to delete them first, or pick another --out."
        )
    for p in old:
        p.unlink()
    (Path(out) / "labels.txt").unlink(missing_ok=True)
    Path(out).mkdir(parents=True, exist_ok=True)


def prepare(srcs, out, size, min_size, overwrite=False, labels=False):
    """Merge folders of images into out/1.png ... N.png: RGB, centre-cropped square, size x size. Returns N.
    labels: each image's class is the first-level sub-folder of its SRC (SRC/red_hair/x.png -> red_hair), written
    to out/labels.txt, line n the class of n.png."""
    for src in srcs:
        if not Path(src).is_dir():
            raise SystemExit(f"error: {src} is not a folder; pass folders of images as SRC")
        if Path(src).resolve() == Path(out).resolve():
            raise SystemExit(f"error: --out {out} is also a SRC; write the prepared images to a new folder")
    files, ignored = [], 0  # (path, its first-level sub-folder: the class with --labels)
    for src in srcs:  # SRC folders in the order given, each one's files (sub-folders included) sorted
        for p in sorted(Path(src).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                parts = p.relative_to(src).parts  # (CLASS, ..., file name) for an image in a sub-folder
                if labels and len(parts) == 1:
                    raise SystemExit(f"error: {p} is not in a sub-folder of {src}: with --labels the sub-folder an "
                                     f"image is in names its class; move it into one (e.g. {src}/CLASS/)")
                files.append((p, parts[0]))
            elif p.is_file():
                ignored += 1
    clear_output_folder(out, overwrite)
    if ignored:
        print(f"ignored {ignored} files whose names do not end in {' '.join(sorted(IMAGE_EXTENSIONS))}")

    written, skipped, written_classes = 0, 0, []
    for p, name in tqdm(files, desc="prepare", unit="img"):
        try:
            with Image.open(p) as img:
                img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
                img.load()
        except Exception as e:  # Pillow raises several kinds of errors for broken or unknown files
            tqdm.write(f"skip {p}: cannot read it as an image ({e})")
            skipped += 1
            continue
        if min(img.size) < min_size:
            tqdm.write(f"skip {p}: {img.width}x{img.height} is smaller than --min_size {min_size} on its short side")
            skipped += 1
            continue
        written += 1
        center_crop_resize(to_rgb(img), size).save(Path(out) / f"{written}.png")
        written_classes.append(name)
    print(f"wrote {written} images ({size}x{size} RGB) to {out}; skipped {skipped}")
    if labels:
        write_labels(out, written_classes)
        counts = {name: written_classes.count(name) for name in sorted(set(written_classes))}
        print(f"wrote labels.txt, {len(counts)} classes: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return written


# -----------------------------------------------------------------------------
# models and checkpoints


def build_model_and_diffusion(config):
    """The network and the process a config (a dict of train.py's flags, as stored in a checkpoint) describes."""
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


def checkpoint_contents(obj):
    """The bytes a checkpoint's checksum covers, piece by piece, in a fixed order: every key, every plain value's
    repr (exact for floats) and every tensor's dtype, shape and bytes, through nested dicts, lists and tuples.
    Dicts keep their insertion order through torch.save and torch.load, so the order is the same when checked."""
    if isinstance(obj, torch.Tensor):
        yield f"tensor {obj.dtype} {tuple(obj.shape)}".encode()
        # its values as bytes, whatever its device, strides or dtype (bf16 has no numpy type); a copy only of a
        # tensor on a GPU or not contiguous
        yield obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
    elif isinstance(obj, dict):
        yield f"dict {len(obj)}".encode()
        for key, value in obj.items():
            yield repr(key).encode()
            yield from checkpoint_contents(value)
    elif isinstance(obj, (list, tuple)):
        yield f"{type(obj).__name__} {len(obj)}".encode()
        for value in obj:
            yield from checkpoint_contents(value)
    elif isinstance(obj, (set, frozenset)):  # in an order that does not depend on the process's string hashing
        yield f"{type(obj).__name__} {sorted(repr(value) for value in obj)}".encode()
    else:
        yield repr(obj).encode()  # str, int, float, bool, None


def checksum(obj):
    """CRC-32 of checkpoint_contents(obj), as "crc32:89abcdef": the check zip and PNG use against damage on disk
    or in a copy (it misses one random corruption in 4 billion). About 2 GB/s on one CPU core: 0.6 s for an
    anime64 checkpoint (1.5 GB), where SHA-256 takes 1.3 s."""
    crc = 0
    for piece in checkpoint_contents(obj):
        crc = zlib.crc32(piece, crc)
    return f"crc32:{crc:08x}"


def previous_checkpoint(path):
    """OUT/ckpt.prev.pt for OUT/ckpt.pt: the checkpoint that save_checkpoint replaced last, kept for when the newest
    one is damaged."""
    root, extension = os.path.splitext(os.fspath(path))
    return root + ".prev" + extension


def save_checkpoint(obj, path):
    """torch.save of a checkpoint dict with the checksum of its contents (load_checkpoint checks it), keeping the
    checkpoint it replaces as previous_checkpoint(path): write path.tmp and fsync it, rename path to OUT/ckpt.prev.pt,
    rename path.tmp to path. os.replace is atomic, so a crash or kill -9 at any moment leaves the last complete
    checkpoint on disk: as path until the first rename, then as ckpt.prev.pt (train.py resumes from it when path
    is missing) until the new one is path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    contents = {key: value for key, value in obj.items() if key != "checksum"}  # a loaded one re-saved
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({**contents, "checksum": checksum(contents)}, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        os.replace(path, previous_checkpoint(path))
    os.replace(tmp, path)


# What reading a truncated, foreign or damaged file raises, in torch.load (its unpickler and zip reader) and in
# Python's zipfile: more than the documented errors, as fuzzing with random bytes and changed bytes shows
# (tests/test_checkpoint.py). Only the reading of the file goes under these.
UNREADABLE = (RuntimeError, EOFError, KeyError, OSError, ValueError, IndexError, TypeError, AttributeError,
              AssertionError, zipfile.BadZipFile, zlib.error)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict and check its checksum (of those saved before there was one, only the pickle is
    checked, by the zip's CRC-32: the tensors load unchecked).
    weights_only=True lets through only tensors and plain Python values (dict, list, str, numbers), so a file that
    smuggles in code is refused instead of run. Raises FileNotFoundError or ValueError with a one-line message,
    which names OUT/ckpt.prev.pt when it exists."""
    path = os.fspath(path)
    previous = previous_checkpoint(path)
    use_previous = f"; {previous}, the checkpoint saved before it, may be intact" if os.path.isfile(previous) else ""
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a folder; pass the checkpoint in it, e.g. {os.path.join(path, 'ckpt.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path, or train one with "
                                f"train.py{use_previous}")
    unreadable = f"{path} is not a checkpoint made by this project's train.py, or it is damaged or truncated"
    try:
        with warnings.catch_warnings():
            # a damaged file makes torch warn (e.g. "Detected pickle protocol 81") before it fails: one line is enough
            warnings.simplefilter("ignore", UserWarning)
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if not is_zip:  # torch.save writes a zip archive; this is some other kind of file
            raise ValueError(f"{path} is not a checkpoint made by this project's train.py{use_previous}") from None
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))  # what unpickling would have imported and called
        if not wanted:  # an opcode or value the weights-only unpickler does not accept
            raise ValueError(f"{unreadable} (its pickle is not valid){use_previous}") from None
        raise ValueError(
            f"refused to load {path}: it is not a checkpoint made by this project, or it is damaged; it contains "
            f"pickled Python objects ({wanted.group(1)}) that could run code when loaded, so it was not loaded, for "
            f"safety{use_previous}") from None
    except UNREADABLE as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{unreadable} ({type(e).__name__}: {message}){use_previous}") from None
    damaged = (f"{path} is damaged: its contents do not match the checksum saved with them (a disk error, or a copy "
               f"that did not finish), so it was not loaded; if it is a copy, copy it again{use_previous}")
    stored = checkpoint.pop("checksum", None) if isinstance(checkpoint, dict) else None
    if stored is not None:
        if stored != checksum(checkpoint):
            raise ValueError(damaged)
        return checkpoint
    # No checksum: saved before there were any (nothing to check the tensors with), or a damaged byte ended the
    # pickle early, at an inner object, or renamed the checksum's entry. The CRC-32 of the pickle in the zip
    # (0: torch did not compute it) tells them apart.
    try:
        with zipfile.ZipFile(path) as archive:
            record = archive.infolist()[0]  # the pickle, ARCHIVE/data.pkl: torch.save writes it first
            if record.CRC:
                archive.read(record)  # checks the CRC-32
    except UNREADABLE:
        raise ValueError(f"{unreadable} (its pickle does not match the CRC-32 in the zip){use_previous}") from None
    return checkpoint


def load_model(path, device="cpu", use_ema=True):
    """The trained network (in eval mode, on device) and its process from a train.py checkpoint, for sampling and
    evaluation: (model, diffusion, config, step). use_ema picks the EMA weights, the ones to sample from.
    Raises FileNotFoundError or ValueError with a one-line message for a file that is not such a checkpoint."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"config", "model", "ema", "step"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a checkpoint made by this project's train.py "
                         f"(it lacks the config, model, ema and step entries)")
    config = checkpoint["config"]
    try:
        model, diffusion = build_model_and_diffusion(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise ValueError(f"the config stored in {path} does not describe a model ({type(e).__name__}: {e})") from None
    weights = checkpoint["ema" if use_ema else "model"]
    # Compare names and shapes first: load_state_dict's own error is a page long
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in weights.items()}
    if expected != found:
        name = next(name for name in sorted(expected.keys() | found.keys()) if expected.get(name) != found.get(name))
        raise ValueError(
            f"the weights in {path} do not fit the model its config describes: {name} is "
            f"{found.get(name, 'missing')} in the file and {expected.get(name, 'absent')} in the model; the file "
            f"was changed after training, or comes from another version of this project")
    model.load_state_dict(weights)
    # NHWC: on a GPU the convs run on tensor cores without layout transposes; on the CPU oneDNN's forward convs are
    # faster in NHWC too (a sampling step 1.15-1.25x on 2 AVX2 cores), though training there gains nothing from it
    model.to(device, memory_format=torch.channels_last).eval()
    return model, diffusion.to(device), config, checkpoint["step"]


def add_sampling_flags(p):
    """The flags of sample.py and eval.py that pick the checkpoint's weights, the sampler and the hardware."""
    p.add_argument("checkpoint", help="OUT/ckpt.pt written by train.py; the model is rebuilt from the config inside")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps K (None: all T steps of training). With fewer, a respaced process is "
                   "sampled (sec. 4); with learned variances it keeps most of the quality at 50-100 steps")
    p.add_argument("--ddim", action="store_true", help="DDIM updates (Song et al. 2020) instead of ancestral sampling")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's noise scale: 0 = deterministic, 1 = like ancestral")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="class-conditional models: classifier-free guidance weight w, eps = (1 + w) eps(x, class) - "
                   "w eps(x, no class); 0 = plain conditional sampling, larger = more typical of the class")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 where the hardware has it (GPUs from Ampere on, CPUs with AVX-512 "
                   "BF16 or AMX), fp16 on older GPUs, else fp32")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")


def load_for_sampling(args):
    """What the flags of add_sampling_flags ask for: (model, diffusion, config, step, device, autocast dtype).
    A bad checkpoint or --steps exits with one line that says what to do."""
    device = pick_device(args.device)
    try:
        model, diffusion, config, step = load_model(args.checkpoint, device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    T = diffusion.num_timesteps
    if args.steps is not None and not 2 <= args.steps <= T:
        raise SystemExit(f"error: --steps {args.steps} must be between 2 and the T = {T} the model was trained with")
    if args.guidance and not config.get("classes"):
        raise SystemExit(f"error: --guidance needs a class-conditional model; {args.checkpoint} was trained without "
                         f"--class_cond")
    if args.guidance < 0:
        raise SystemExit(f"error: --guidance {args.guidance} must be 0 (no guidance) or more")
    return model, diffusion, config, step, device, autocast_dtype(device, args.precision)


# -----------------------------------------------------------------------------
# devices, precision, seeds


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    torch.cuda.manual_seed_all(seed)


def pick_device(name="auto"):
    """'auto': the GPU this process should use (cuda:LOCAL_RANK under torchrun), else the CPU. Apple's mps is
    not picked: it has no float64, which the diffusion schedule is kept in."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")
    return torch.device("cpu")


def native_bf16(device):
    """Whether device computes bf16 in hardware: GPUs from Ampere (compute capability 8.0) on, CPUs with AVX-512
    BF16 or AMX. Elsewhere bf16 is emulated: on an AVX2-only CPU about 20x slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(device, precision):
    """The dtype for torch.autocast, or None for plain fp32. precision is 'auto', 'fp32', 'bf16' or 'fp16'.
    'auto' picks bf16 where the device has it natively (see native_bf16), else fp16 on a GPU (the caller then
    needs a GradScaler), else fp32. Asking for bf16 where it is emulated, or for fp16 on the CPU, prints a note."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not native_bf16(device):
            print(f"warning: {device.type} here has no native bf16 (a CPU needs AVX-512 BF16 or AMX, a GPU compute "
                  f"capability 8.0+), so bf16 is emulated and much slower than fp32 (about 20x on an AVX2 CPU); "
                  f"use --precision fp32, or auto", file=sys.stderr)
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            print("note: fp16 on the CPU is meant to rehearse what a GPU without bf16 runs (fp16 autocast, and a "
                  "gradient scaler in training): a few steps, not a run; the CPU's fp16 convolution backward has no "
                  "fast kernel, so a training step is some 100x slower than in fp32", file=sys.stderr)
        return torch.float16
    if precision == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    raise ValueError(f"unknown precision {precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'")


def autocast(device, dtype):
    """torch.autocast to dtype on device's type, or a context that changes nothing when dtype is None (fp32)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="turn folders of images into a dataset folder of numbered PNGs",
                            description="Merge folders of .jpg/.jpeg/.png/.webp/.bmp images (sub-folders too) into "
                            "OUT/1.png ... N.png: RGB (transparency on white), centre-cropped, resized.")
    p.add_argument("src", nargs="+", metavar="SRC", help="folders of images, read in the order given, files sorted")
    p.add_argument("--out", required=True, help="folder to write 1.png ... N.png into (created if missing)")
    p.add_argument("--size", type=int, default=64,
                   help="side of the square output images, in pixels (default %(default)s)")
    p.add_argument("--min_size", type=int, default=64,
                   help="skip images whose short side is below this many pixels; raise it to keep blurry "
                   "upscaled images out (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="delete numbered PNGs already in --out first")
    p.add_argument("--labels", action="store_true",
                   help="also write OUT/labels.txt, line n the class of n.png: the first-level sub-folder of SRC "
                   "the image came from (SRC/red_hair/x.png -> red_hair)")

    args = parser.parse_args()
    prepare(args.src, args.out, args.size, args.min_size, args.overwrite, args.labels)

"""
Small tools you run by hand, plus the helpers that train.py, sample.py and eval.py share.

    python util.py prepare ~/Downloads/faces --out data/faces --size 64     # your images -> 1.png ... N.png
    python util.py emoji --font /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf --out data/emoji --size 32

A dataset here is a folder of RGB PNGs named 1.png ... N.png, all size x size.
"""

import argparse
import math
import os
import pickle
import random
import re
from pathlib import Path

import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont, ImageOps, features
from tqdm import tqdm

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

# -----------------------------------------------------------------------------
# helpers shared by train.py, sample.py and eval.py


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


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    torch.cuda.manual_seed_all(seed)


def save_image_grid(x, path, nrow=None):
    """x: (B, C, H, W) in [-1, 1] -> one PNG with the B images in a grid, nrow images per row (default ~square)."""
    if nrow is None:
        nrow = math.ceil(math.sqrt(x.shape[0]))
    x01 = (x.detach().float().cpu().clamp(-1, 1) + 1) / 2  # -1 -> 0 (black), 1 -> 1 (white)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(x01, path, nrow=nrow, padding=2, pad_value=1.0)


def save_checkpoint(obj, path):
    """torch.save that never leaves a half-written file at path: write path.tmp, fsync, then rename over path.
    os.replace is atomic, so a crash keeps either the old checkpoint or the new one, never a broken one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict. weights_only=True lets through only tensors and plain Python values (dict, list,
    str, numbers), so a file that smuggles in code is refused instead of run."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; check the path, or train one with train.py")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"refused to load {path}: it is not a checkpoint made by this project; it contains pickled Python "
            f"objects that could run code when loaded, so it was not loaded for safety ({e})"
        ) from None


def pick_device(name="auto"):
    """'auto': the GPU this process should use (cuda:LOCAL_RANK under torchrun), else the CPU. Apple's mps is
    not picked: it has no float64, which the diffusion schedule is kept in."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda")
    return torch.device("cpu")


def autocast_dtype(device, precision):
    """The dtype for torch.autocast, or None for plain fp32. precision is 'auto', 'fp32', 'bf16' or 'fp16'.
    'auto' picks bf16 on GPUs that have it natively, fp16 on older GPUs (the caller then needs a GradScaler),
    and fp32 on the CPU: CPU bf16 autocast is slower than fp32 on most CPUs."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise ValueError("precision 'fp16' is not supported on the CPU; use 'bf16' or 'fp32' there")
        return torch.float16
    if precision == "auto":
        if device.type != "cuda":
            return None
        # bf16 runs natively from Ampere (compute capability 8.0) on; older GPUs emulate it slowly, so fp16 there
        native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native_bf16 else torch.float16
    raise ValueError(f"unknown precision {precision!r}; use 'auto', 'fp32', 'bf16' or 'fp16'")


# -----------------------------------------------------------------------------
# writing a dataset folder


def numbered_pngs(folder):
    return [p for p in Path(folder).glob("*.png") if re.fullmatch(r"\d+\.png", p.name)]


def clear_output_folder(out, overwrite):
    """Make out an empty place for 1.png ... N.png; old numbered PNGs would mix two datasets."""
    old = numbered_pngs(out)
    if old and not overwrite:
        raise SystemExit(
            f"error: {out} already holds {len(old)} numbered PNGs (1.png, 2.png, ...) from an earlier run; "
            f"writing there would mix two datasets. Pass --overwrite to delete them first, or pick another --out."
        )
    for p in old:
        p.unlink()
    Path(out).mkdir(parents=True, exist_ok=True)


def prepare(srcs, out, size, min_size, overwrite=False):
    """Merge folders of images into out/1.png ... N.png: RGB, centre-cropped square, size x size. Returns N."""
    for src in srcs:
        if not Path(src).is_dir():
            raise SystemExit(f"error: {src} is not a folder; pass folders of images as SRC")
        if Path(src).resolve() == Path(out).resolve():
            raise SystemExit(f"error: --out {out} is also a SRC; write the prepared images to a new folder")
    clear_output_folder(out, overwrite)
    files, ignored = [], 0
    for src in srcs:  # SRC folders in the order given, each one's files (sub-folders included) sorted
        for p in sorted(Path(src).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(p)
            elif p.is_file():
                ignored += 1
    if ignored:
        print(f"ignored {ignored} files whose names do not end in {' '.join(sorted(IMAGE_EXTENSIONS))}")

    written, skipped = 0, 0
    for p in tqdm(files, desc="prepare", unit="img"):
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
    print(f"wrote {written} images ({size}x{size} RGB) to {out}; skipped {skipped}")
    return written


# -----------------------------------------------------------------------------
# the bundled demo data: face emoji rendered from Noto Color Emoji

NOTO_COLOR_EMOJI = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # where Debian puts it
SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)  # Fitzpatrick modifiers: light ... dark
ZWJ, VS16, MALE, FEMALE = 0x200D, 0xFE0F, 0x2642, 0x2640  # VS16 asks for the colour (emoji) form of a symbol

# Unicode "Smileys & Emotion": the face subgroups, with cat and monkey faces. Ranges are inclusive.
SMILEY_RANGES = [
    (0x1F600, 0x1F644),  # grinning face ... face with rolling eyes, with the 9 cat faces at 1F638-1F640
    (0x1F648, 0x1F64A),  # see-, hear-, speak-no-evil monkey
    (0x1F910, 0x1F917),  # zipper-mouth face ... hugging face (robot at 1F916)
    (0x1F920, 0x1F925),  # cowboy hat face ... lying face
    (0x1F927, 0x1F92F),  # sneezing face ... exploding head
    (0x1F970, 0x1F976),  # smiling face with hearts ... cold face
    (0x1F978, 0x1F97A),  # disguised face, face holding back tears, pleading face
    (0x1F9D0, 0x1F9D0),  # face with monocle
    (0x1FAE0, 0x1FAE5),  # melting face ... dotted line face
    (0x1FAE8, 0x1FAE8),  # shaking face (Unicode 15)
    (0x1F479, 0x1F47B),  # ogre, goblin, ghost
    (0x1F47D, 0x1F480),  # alien, alien monster, imp, skull
]
SMILEY_SEQUENCES = [
    (0x2639, VS16),  # frowning face
    (0x263A, VS16),  # smiling face
    (0x2620, VS16),  # skull and crossbones
    (0x1F4A9,),  # pile of poo
    (0x1F636, ZWJ, 0x1F32B, VS16),  # face in clouds
    (0x1F62E, ZWJ, 0x1F4A8),  # face exhaling
    (0x1F635, ZWJ, 0x1F4AB),  # face with spiral eyes
]
# "People & Body" heads; each one also comes in the 5 skin tones.
PERSONS = [0x1F476, 0x1F9D2, 0x1F466, 0x1F467, 0x1F9D1, 0x1F468, 0x1F469, 0x1F9D3, 0x1F474, 0x1F475]
# baby, child, boy, girl, person, man, woman, older person, old man, old woman
HAIRSTYLES = [0x1F9B0, 0x1F9B1, 0x1F9B3, 0x1F9B2]  # red, curly, white hair, bald (for person, man, woman)
ROLES = [0x1F46E, 0x1F477, 0x1F482, (0x1F575, VS16), 0x1F473, 0x1F470, 0x1F935, 0x1F9D9, 0x1F9DB, 0x1F9DD]
# police officer, construction worker, guard, detective, person wearing turban, person with veil,
# person in tuxedo, mage, vampire, elf: each as person, man and woman
PEOPLE_SEQUENCES = [
    (0x1F471,), (0x1F471, ZWJ, FEMALE, VS16), (0x1F471, ZWJ, MALE, VS16),  # person, woman, man: blond hair
    (0x1F9D4,), (0x1F9D4, ZWJ, FEMALE, VS16), (0x1F9D4, ZWJ, MALE, VS16),  # person, woman, man: beard
    (0x1F472,), (0x1F9D5,), (0x1F478,), (0x1F934,), (0x1FAC5,),  # skullcap, headscarf, princess, prince, crown
    (0x1F47C,), (0x1F385,), (0x1F936,), (0x1F9D1, ZWJ, 0x1F384), (0x1F977,),  # baby angel, Santa, Mrs/Mx Claus, ninja
]
# Animal faces from "Animals & Nature".
ANIMAL_SEQUENCES = [
    (0x1F435,), (0x1F436,), (0x1F431,), (0x1F42F,), (0x1F434,), (0x1F984,), (0x1F993,), (0x1F42E,),
    (0x1F437,), (0x1F42D,), (0x1F439,), (0x1F430,), (0x1F43B,), (0x1F43B, ZWJ, 0x2744, VS16), (0x1F428,),
    (0x1F43C,), (0x1F438,), (0x1F432,), (0x1F43A,), (0x1F98A,), (0x1F99D,), (0x1F981,),
]  # monkey, dog, cat, tiger, horse, unicorn, zebra, cow, pig, mouse, hamster, rabbit, bear, polar bear,
# koala, panda, frog, dragon, wolf, fox, raccoon, lion


def with_skin_tone(seq, tone):
    """The skin tone goes right after the base person, e.g. man + tone + ZWJ + red hair."""
    rest = seq[1:]
    if rest[:1] == (VS16,):  # the tone replaces VS16: both already say "draw it as an emoji"
        rest = rest[1:]
    return (seq[0], tone) + rest


def emoji_sequences():
    """Every candidate emoji as a tuple of code points, sorted, so the dataset's order never changes."""
    people = [(p,) for p in PERSONS] + [(p, ZWJ, hair) for p in (0x1F9D1, 0x1F468, 0x1F469) for hair in HAIRSTYLES]
    for role in ROLES:
        role = role if isinstance(role, tuple) else (role,)
        people += [role, role + (ZWJ, MALE, VS16), role + (ZWJ, FEMALE, VS16)]
    people += PEOPLE_SEQUENCES
    toned = [with_skin_tone(seq, tone) for seq in people for tone in SKIN_TONES]
    smileys = [(cp,) for lo, hi in SMILEY_RANGES for cp in range(lo, hi + 1)] + SMILEY_SEQUENCES
    return sorted(set(smileys + people + toned + ANIMAL_SEQUENCES))


def render_emoji(font, text, size):
    """Draw one emoji at the font's bitmap size, crop it, put it on white, pad it square, shrink to size."""
    canvas = Image.new("RGBA", (300, 300), (0, 0, 0, 0))  # glyphs are ~136x128 px, drawn at (80, 80)
    ImageDraw.Draw(canvas).text((80, 80), text, font=font, embedded_color=True)
    bbox = canvas.getbbox()  # of the non-transparent pixels; None for the font's empty "missing glyph"
    if bbox is None:
        return None
    glyph = to_rgb(canvas.crop(bbox))
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.resize((size, size), Image.LANCZOS)


def emoji(font_path, out, size, test_fraction, seed):
    """Render the face emoji to out/1.png ... N.png and a held-out random test_fraction to {out}_test/."""
    if not os.path.isfile(font_path):
        raise SystemExit(f"error: font {font_path} not found; apt-get install fonts-noto-color-emoji, or pass --font")
    if not features.check("raqm"):
        raise SystemExit("error: this Pillow has no raqm text layout, needed to join skin tones and ZWJ sequences "
                         "into one emoji; install a Pillow wheel from PyPI (they include it)")
    # 109 px is the one size this bitmap font has; raqm joins a person + skin tone into one glyph
    font = ImageFont.truetype(font_path, 109, layout_engine=ImageFont.Layout.RAQM)
    one_emoji_width = font.getlength(chr(0x1F600))
    images = []
    for seq in tqdm(emoji_sequences(), desc="emoji", unit="img"):
        text = "".join(chr(cp) for cp in seq)
        if font.getlength(text) != one_emoji_width:  # the font has no single glyph for it and draws its parts
            continue
        img = render_emoji(font, text, size)
        if img is not None:
            images.append(img)
    test = set(random.Random(seed).sample(range(len(images)), round(test_fraction * len(images))))
    train_images = [img for i, img in enumerate(images) if i not in test]
    test_images = [img for i, img in enumerate(images) if i in test]
    for folder, selected in [(out, train_images), (f"{out}_test", test_images)]:
        clear_output_folder(folder, overwrite=True)  # regenerating replaces the previous emoji set
        for n, img in enumerate(selected, start=1):
            img.save(Path(folder) / f"{n}.png")
        print(f"wrote {len(selected)} emoji ({size}x{size} RGB) to {folder}")


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

    e = commands.add_parser("emoji", help="regenerate the bundled face-emoji dataset (data/emoji)",
                            description="Render the face emoji of Noto Color Emoji to OUT/1.png ... N.png and a "
                            "held-out OUT_test/1.png ... M.png. Numbered PNGs already there are replaced.")
    e.add_argument("--font", default=NOTO_COLOR_EMOJI,
                   help="path to NotoColorEmoji.ttf, from Debian's fonts-noto-color-emoji (default %(default)s)")
    e.add_argument("--out", default="data/emoji",
                   help="training images go here, held-out ones to OUT_test (default %(default)s)")
    e.add_argument("--size", type=int, default=32,
                   help="side of the square output images, in pixels (default %(default)s)")
    e.add_argument("--test_fraction", type=float, default=0.05,
                   help="share of the emoji held out for testing (default %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random held-out selection (default %(default)s)")

    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.src, args.out, args.size, args.min_size, args.overwrite)
    else:
        emoji(args.font, args.out, args.size, args.test_fraction, args.seed)

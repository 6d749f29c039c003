"""
Builds the bundled demo data: the face emoji of Noto Color Emoji, rendered to data/emoji/1.png ... N.png (32x32,
on white) with a random 5% held out in data/emoji_test/, and in each folder a labels.txt whose line n is the
class of n.png (smiley, person or animal). The bundled folders were made with the defaults:

    apt-get install fonts-noto-color-emoji
    python data/emoji.py                      # rewrites data/emoji and data/emoji_test
"""
import argparse
import os
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for util.py
import util  # noqa: E402

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


def emoji_groups():
    """The candidate emoji by class, each a list of tuples of code points. The classes are the labels of
    labels.txt: smiley (Unicode's Smileys & Emotion faces, cat and monkey faces included), person (heads from
    People & Body, in every skin tone) and animal (animal faces)."""
    people = [(p,) for p in PERSONS] + [(p, ZWJ, hair) for p in (0x1F9D1, 0x1F468, 0x1F469) for hair in HAIRSTYLES]
    for role in ROLES:
        role = role if isinstance(role, tuple) else (role,)
        people += [role, role + (ZWJ, MALE, VS16), role + (ZWJ, FEMALE, VS16)]
    people += PEOPLE_SEQUENCES
    toned = [with_skin_tone(seq, tone) for seq in people for tone in SKIN_TONES]
    smileys = [(cp,) for lo, hi in SMILEY_RANGES for cp in range(lo, hi + 1)] + SMILEY_SEQUENCES
    return {"smiley": smileys, "person": people + toned, "animal": ANIMAL_SEQUENCES}


def emoji_sequences():
    """Every candidate emoji as a tuple of code points, sorted, so the dataset's order never changes."""
    return sorted({seq for group in emoji_groups().values() for seq in group})


def render_emoji(font, text, size):
    """Draw one emoji at the font's bitmap size, crop it, put it on white, pad it square, shrink to size."""
    canvas = Image.new("RGBA", (300, 300), (0, 0, 0, 0))  # glyphs are ~136x128 px, drawn at (80, 80)
    ImageDraw.Draw(canvas).text((80, 80), text, font=font, embedded_color=True)
    bbox = canvas.getbbox()  # of the non-transparent pixels; None for the font's empty "missing glyph"
    if bbox is None:
        return None
    glyph = util.to_rgb(canvas.crop(bbox))
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
    class_of = {seq: name for name, group in emoji_groups().items() for seq in group}
    images = []  # (image, class)
    for seq in tqdm(emoji_sequences(), desc="emoji", unit="img"):
        text = "".join(chr(cp) for cp in seq)
        if font.getlength(text) != one_emoji_width:  # the font has no single glyph for it and draws its parts
            continue
        img = render_emoji(font, text, size)
        if img is not None:
            images.append((img, class_of[seq]))
    test = set(random.Random(seed).sample(range(len(images)), round(test_fraction * len(images))))
    train_images = [image for i, image in enumerate(images) if i not in test]
    test_images = [image for i, image in enumerate(images) if i in test]
    for folder, selected in [(out, train_images), (f"{out}_test", test_images)]:
        util.clear_output_folder(folder, overwrite=True)  # regenerating replaces the previous emoji set
        for n, (img, _) in enumerate(selected, start=1):
            img.save(Path(folder) / f"{n}.png")
        util.write_labels(folder, [name for _, name in selected])  # line n: the class of n.png
        counts = {name: sum(name == label for _, label in selected) for name in sorted(class_of.values())}
        print(f"wrote {len(selected)} emoji ({size}x{size} RGB) and labels.txt to {folder}: "
              + ", ".join(f"{count} {name}" for name, count in counts.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", default=NOTO_COLOR_EMOJI,
                        help="path to NotoColorEmoji.ttf, from Debian's fonts-noto-color-emoji (default %(default)s)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "emoji"),
                        help="training images go here, held-out ones to OUT_test; numbered PNGs already there are "
                        "replaced (default %(default)s)")
    parser.add_argument("--size", type=int, default=32,
                        help="side of the square output images, in pixels (default %(default)s)")
    parser.add_argument("--test_fraction", type=float, default=0.05,
                        help="share of the emoji held out for testing (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random held-out selection (default %(default)s)")
    args = parser.parse_args()
    emoji(args.font, args.out, args.size, args.test_fraction, args.seed)

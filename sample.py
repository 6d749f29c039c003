"""
Generate images from a trained model as numbered PNGs 1.png ... N.png, e.g. for FID.

    python sample.py runs/emoji/ckpt.pt --num 64 --steps 50       # 50 respaced steps (sec. 4): 20x faster
    python sample.py runs/anime64/ckpt.pt --num 50000 --out samples/ --npz samples.npz
    python -m pytorch_fid samples/ AnimeFaces64/                   # FID (pip install pytorch-fid)
    python sample.py runs/superres/ckpt.pt --low_res small/ --steps 100   # super-resolution: small/N.png -> N.png

Images are made in batches. Batch b draws all its noise from its own generator, seeded by --seed and b, and is
always drawn at the full --batch_size, so image i depends only on the checkpoint, the sampling flags, --seed,
--batch_size and i (not on --num, nor on which batches ran before). Hence the same seed and batch size give the
same images, and a run that was interrupted continues, when the same command is run again, with the batches it
had not finished, writing the images an uninterrupted run would have written. OUT/sampling.json records the
flags, so that a folder is never filled from two different runs. Results depend on the device (CPU or GPU).
"""
import argparse
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import util
from diffusion import classifier_free_guidance


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    util.add_sampling_flags(p)  # checkpoint, --steps, --ddim, --eta, --guidance, --no_ema, --precision, --device
    p.add_argument("--num", type=int, default=None,
                   help="how many images (FID: 50000). None: 64, or with --low_res one per low-res image")
    p.add_argument("--out", default=None, help="folder for 1.png ... N.png (None: generated/ beside the checkpoint)")
    p.add_argument("--batch_size", type=int, default=64,
                   help="images per batch: as large as memory allows; changing it changes the images")
    p.add_argument("--seed", type=int, default=0, help="same seed and batch size, same images")
    p.add_argument("--class", dest="classes", action="append", default=None, metavar="NAME",
                   help="class-conditional models: the class to sample; repeat it for several, taken in turn "
                   "(None: all the model's classes in turn). OUT/labels.txt then says each image's class")
    p.add_argument("--low_res", default=None, metavar="DIR",
                   help="super-resolution models (train.py --super_res_from S): enlarge DIR's S x S images 1.png ... "
                   "N.png, one output per input: OUT/n.png enlarges DIR/n.png")
    p.add_argument("--npz", default=None, metavar="FILE",
                   help="also write all N images as one uint8 array (N, H, W, 3) to FILE, under the key arr_0")
    return p.parse_args(argv)


def batch_generator(seed, batch, device):
    """Batch b's own random stream (x_T and every step's noise), the same whoever ran the batches before it."""
    return torch.Generator(device).manual_seed(seed * 1_000_000 + batch)


def save_png(pixels, path):
    """(H, W, 3) uint8 -> PNG, written to a temporary name and renamed: a PNG that exists is a complete one."""
    Image.fromarray(pixels.numpy()).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def open_low_res(args, config):
    """The inputs of a super-resolution model: --low_res's images 1.png ... N.png, checked to be S x S, as a
    util.NumberedImages (item n - 1 is n.png as a (3, S, S) tensor in [-1, 1]); None for other models. Exits with
    one line when --low_res and the model do not go together, or naming the first bad file and what to do."""
    folder, size = args.low_res, config.get("super_res_from")
    if size and not folder:
        raise SystemExit(f"error: {args.checkpoint} is a super-resolution model ({size}x{size} -> "
                         f"{config['image_size']}x{config['image_size']}): pass --low_res DIR, a folder of "
                         f"{size}x{size} images 1.png ... N.png")
    if folder and not size:
        raise SystemExit(f"error: --low_res needs a super-resolution model; {args.checkpoint} was trained without "
                         f"--super_res_from")
    if not folder:
        return None
    try:
        images = util.NumberedImages(folder, size)
    except FileNotFoundError as error:
        raise SystemExit(f"error: --low_res: {error}") from None
    fix = f"make them with: python util.py prepare YOUR_IMAGES --out DIR --size {size} --min_size {size}"
    for path in images.paths:
        try:
            with Image.open(path) as img:
                found = img.size
        except OSError as error:
            raise SystemExit(f"error: --low_res: cannot read {path} as an image ({error})") from None
        if found != (size, size):
            raise SystemExit(f"error: --low_res: {path} is {found[0]}x{found[1]}, but this model enlarges "
                             f"{size}x{size} images; {fix}")
    return images


def check_output_folder(out, settings):
    """out may hold only what an earlier run of this same command wrote; record the command there."""
    manifest = os.path.join(out, "sampling.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            previous = json.load(f)
        changed = [f"{key} {previous.get(key)} (now {value})" for key, value in settings.items()
                   if previous.get(key) != value]
        if changed:
            raise SystemExit(f"error: {out} holds images of another sampling run ({', '.join(changed)}): run that "
                             f"command to continue it, or pass another --out")
    elif util.numbered_pngs(out):
        raise SystemExit(f"error: {out} already holds numbered PNGs that sample.py did not write; pass another --out")
    os.makedirs(out, exist_ok=True)
    with open(manifest + ".tmp", "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(manifest + ".tmp", manifest)


def main(argv=None):
    args = parse_args(argv)
    model, diffusion, config, step, device, amp_dtype = util.load_for_sampling(args)
    steps = args.steps or diffusion.num_timesteps
    low_res_images = open_low_res(args, config)  # None unless the model is a super-resolution one
    num_inputs = len(low_res_images.paths) if args.low_res else None
    args.num = args.num or num_inputs or 64
    if args.low_res and args.num > num_inputs:
        raise SystemExit(f"error: --num {args.num} is more than the {num_inputs} images of {args.low_res}")
    if args.num < 1 or args.batch_size < 1:
        raise SystemExit(f"error: --num {args.num} and --batch_size {args.batch_size} must be at least 1")
    known = config.get("classes") or []
    if args.classes and not known:
        raise SystemExit(f"error: --class needs a class-conditional model; {args.checkpoint} was trained without "
                         f"--class_cond")
    unknown = [name for name in args.classes or [] if name not in known]
    if unknown:
        raise SystemExit(f"error: --class {unknown[0]} is not a class of this model; it knows {', '.join(known)}")
    classes = args.classes or known  # taken in turn by images 1, 2, ...; [] if unconditional
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "generated")
    settings = dict(checkpoint=os.path.abspath(args.checkpoint), checkpoint_step=step, ema=not args.no_ema,
                    steps=steps, ddim=args.ddim, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                    device=device.type, precision=str(amp_dtype or torch.float32), classes=classes,
                    guidance=args.guidance, low_res=args.low_res and os.path.abspath(args.low_res))
    check_output_folder(out, settings)

    def png(i):
        return os.path.join(out, f"{i}.png")

    def class_name(i):  # of image i + 1: every batch is labelled in full, like its noise, so i alone decides it
        return classes[i % len(classes)]

    # image i (1-based) is row (i - 1) % batch_size of batch (i - 1) // batch_size
    num_batches = math.ceil(args.num / args.batch_size)
    numbers = [range(b * args.batch_size + 1, min((b + 1) * args.batch_size, args.num) + 1) for b in range(num_batches)]
    todo = [b for b in range(num_batches) if not all(os.path.exists(png(i)) for i in numbers[b])]
    done = args.num - sum(len(numbers[b]) for b in todo)
    if done:
        print(f"continuing in {out}: {done} of {args.num} images are there already")
    shape = (args.batch_size, model.in_channels, config["image_size"], config["image_size"])
    progress = tqdm(total=args.num, initial=done, unit="img", desc="sampling", dynamic_ncols=True)
    sampler = classifier_free_guidance(model, args.guidance, len(known))  # the model itself when guidance = 0
    for b in todo:
        model_kwargs = {}
        if classes:
            names = [class_name(i) for i in range(b * args.batch_size, (b + 1) * args.batch_size)]
            model_kwargs["y"] = torch.tensor([known.index(name) for name in names], device=device)
        if args.low_res:  # row r enlarges image b * batch_size + r; the rows past the last image repeat it
            rows = [min(i, num_inputs - 1) for i in range(b * args.batch_size, (b + 1) * args.batch_size)]
            low_res = torch.stack([low_res_images[i] for i in rows]).to(device)  # (B, 3, S, S)
            model_kwargs["low_res"] = util.upsample(low_res, config["image_size"])  # (B, 3, H, W)
        with util.autocast(device, amp_dtype):
            x = diffusion.sample(sampler, shape, steps=steps, ddim=args.ddim, eta=args.eta, device=device,
                                 model_kwargs=model_kwargs, generator=batch_generator(args.seed, b, device),
                                 progress=True)  # (B, 3, H, W)
        pixels = util.to_uint8(x)  # (batch_size, H, W, 3); the last batch keeps only the images it needs
        for i, image in zip(numbers[b], pixels):
            save_png(image, png(i))
        progress.update(len(numbers[b]))
    progress.close()
    if classes:  # the output is itself a labelled dataset: line n is the class of n.png
        util.write_labels(out, [class_name(i) for i in range(args.num)])
    print(f"wrote {args.num} images ({config['image_size']}x{config['image_size']}) to {out}")

    if args.npz:
        images = np.stack([np.asarray(Image.open(png(i)).convert("RGB")) for i in range(1, args.num + 1)])
        with open(args.npz + ".tmp", "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, arr_0=images)  # (N, H, W, 3) uint8, the layout of the reference code's evaluator
        os.replace(args.npz + ".tmp", args.npz)
        print(f"wrote {args.npz}: {images.shape} {images.dtype}")


if __name__ == "__main__":
    main()

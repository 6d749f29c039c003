"""
Generate images from a trained model as numbered PNGs 1.png ... N.png, e.g. for FID (and train.py's sample grids).

    python sample.py runs/emoji/ckpt.pt --num 64 --steps 50       # 50 respaced steps (sec. 4): 20x faster
    python sample.py runs/anime64/ckpt.pt --num 50000 --out samples/ --npz samples.npz
    python -m pytorch_fid samples/ AnimeFaces64/                   # FID (pip install pytorch-fid)
    python sample.py runs/superres/ckpt.pt --low_res small/ --steps 100   # super-resolution: small/N.png -> N.png

Writes into --out 1.png ... N.png, sampling.json (its flags: a folder never mixes two runs) and, class-conditional,
labels.txt. Batch b draws its noise from a generator seeded by --seed and b, at the full --batch_size: image i
depends only on the checkpoint, the flags, the device and i, so a run started again writes just the missing batches.
"""
import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import util
from diffusion import classifier_free_guidance


def add_sampling_flags(p):
    """The flags of sample.py and eval.py that pick the checkpoint's weights, the sampler and the hardware."""
    p.add_argument("checkpoint", help="OUT/ckpt.pt written by train.py; the model is rebuilt from the config inside")
    p.add_argument("--steps", type=int, default=None, help="sampling steps K (None: all T); fewer respace (sec. 4)")
    p.add_argument("--ddim", action="store_true", help="DDIM updates (Song et al. 2020) instead of ancestral ones")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's noise scale: 0 = deterministic, 1 = like ancestral")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance w (class-conditional models)")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 where native, fp16 on older GPUs, else fp32")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")


def load_for_sampling(args):
    """(model, diffusion, config, step, device, autocast dtype) for add_sampling_flags' flags; else one line."""
    device = util.pick_device(args.device)
    try:
        model, diffusion, config, step = util.load_model(args.checkpoint, device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    T = diffusion.num_timesteps
    if args.steps is not None and not 2 <= args.steps <= T:
        raise SystemExit(f"error: --steps {args.steps} must be between 2 and the T = {T} the model was trained with")
    if args.guidance < 0 or (args.guidance and not config.get("classes")):
        raise SystemExit(f"error: --guidance {args.guidance} needs a weight of 0 or more and a class-conditional model "
                         f"(train.py --class_cond)")
    return model, diffusion, config, step, device, util.autocast_dtype(device, args.precision)


def save_samples(ema, diffusion, config, step, device, dataset, amp_dtype, tensorboard=None):
    """OUT/samples/STEP.png: EMA samples in 50 respaced steps (sec. 4), the same noise each time. Class-conditional:
    a row per class (the first 8). Super-resolution: rows of three, low-res input, sample, original."""
    num = config["num_samples"]
    size = config["image_size"]
    nrow = None  # the grid's images a row: about sqrt(num)
    row_labels = []
    model_kwargs = {}
    if config["classes"]:
        rows = min(8, len(config["classes"]))
        nrow = max(1, num // rows)
        num = rows * nrow
        row_labels = config["classes"][:rows]
        model_kwargs["y"] = torch.arange(rows, device=device).repeat_interleave(nrow)  # row r: class r
    if config["super_res_from"]:
        num = min(num, len(dataset.paths))  # the first training images, not their mirrors
        nrow = max(1, math.isqrt(num))
        num -= num % nrow  # whole rows
        originals = torch.stack([dataset[i] for i in range(num)]).to(device)  # (num, 3, H, W)
        model_kwargs["low_res"] = util.downsample(originals, config["super_res_from"])  # (num, 3, S, S)
    # on a forked and restored random stream: sampling must not change the training run's
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), util.autocast(device, amp_dtype):
        torch.manual_seed(config["seed"])
        samples = diffusion.sample(ema, (num, 3, size, size), steps=min(50, diffusion.num_timesteps), device=device,
                                   model_kwargs=model_kwargs).float()  # (num, 3, H, W) in [-1, 1]
    if config["super_res_from"]:
        blocky = F.interpolate(model_kwargs["low_res"], size=(size, size), mode="nearest")  # as it is: big pixels
        samples = torch.stack([blocky, samples, originals]).unflatten(1, (-1, nrow)).transpose(0, 1).flatten(0, 2)
        row_labels = [f"{config['super_res_from']}x{config['super_res_from']}", "sample", "original"] * (num // nrow)
    path = os.path.join(config["out_dir"], "samples", f"{step:06d}.png")
    grid = util.save_image_grid(samples, path, nrow=nrow, row_labels=row_labels)
    if tensorboard is not None:  # the grid as saved, labels and all: (H, W, 3) uint8
        tensorboard.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    add_sampling_flags(p)  # checkpoint, --steps, --ddim, --eta, --guidance, --no_ema, --precision, --device
    p.add_argument("--num", type=int, default=None, help="how many images (None: 64, or one per --low_res image)")
    p.add_argument("--out", default=None, help="folder for 1.png ... N.png (None: generated/ beside the checkpoint)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch; changing it changes the images")
    p.add_argument("--seed", type=int, default=0, help="same seed and batch size, same images")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME",
                   help="the class to sample, repeatable (None: every class in turn)")
    p.add_argument("--low_res", metavar="DIR", help="super-resolution models: enlarge DIR/n.png into OUT/n.png")
    p.add_argument("--npz", metavar="FILE", help="also write the N images as one uint8 array (N, H, W, 3), key arr_0")
    return p.parse_args(argv)


def open_low_res(args, config):
    """--low_res's S x S images as a util.NumberedImages, None for other models; one line when they do not fit."""
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
        for path in images.paths:
            with Image.open(path) as img:
                if img.size != (size, size):
                    raise SystemExit(f"error: --low_res: {path} is {img.width}x{img.height}, but this model enlarges "
                                     f"{size}x{size} images; make them with: python util.py prepare YOUR_IMAGES "
                                     f"--out DIR --size {size} --min_size {size}")
    except OSError as error:  # a missing folder, a gap in the numbers, a file that is not an image
        raise SystemExit(f"error: --low_res: {error}") from None
    return images


def check_output_folder(out, settings):
    """out may hold only what an earlier run of this same command wrote; record the command there."""
    manifest = os.path.join(out, "sampling.json")
    if os.path.exists(manifest):
        previous = json.loads(Path(manifest).read_text())
        changed = [f"{k} {previous.get(k)} (now {value})" for k, value in settings.items() if previous.get(k) != value]
        if changed:
            raise SystemExit(f"error: {out} holds images of another sampling run ({', '.join(changed)}): run that "
                             f"command to continue it, or pass another --out")
    elif util.numbered_pngs(out):
        raise SystemExit(f"error: {out} already holds numbered PNGs that sample.py did not write; pass another --out")
    os.makedirs(out, exist_ok=True)
    Path(manifest + ".tmp").write_text(json.dumps(settings, indent=1))
    os.replace(manifest + ".tmp", manifest)


def save_png(pixels, path):
    """(H, W, 3) uint8 -> PNG, written under a temporary name and renamed: a PNG that exists is a complete one."""
    Image.fromarray(pixels.numpy()).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def main(argv=None):
    args = parse_args(argv)
    model, diffusion, config, step, device, amp_dtype = load_for_sampling(args)
    low_res_images = open_low_res(args, config)  # None unless the model is a super-resolution one
    args.num = args.num or (len(low_res_images) if low_res_images is not None else 64)
    if low_res_images is not None and args.num > len(low_res_images):
        raise SystemExit(f"error: --num {args.num} is more than the {len(low_res_images)} images of {args.low_res}")
    if args.num < 1 or args.batch_size < 1:
        raise SystemExit(f"error: --num {args.num} and --batch_size {args.batch_size} must be at least 1")
    known = config.get("classes") or []
    unknown = [name for name in args.classes or [] if name not in known]
    if unknown:
        raise SystemExit(f"error: --class {unknown[0]} is not a class of this model; it knows "
                         f"{', '.join(known) or 'none: it was trained without --class_cond'}")
    classes = args.classes or known  # taken in turn by images 1, 2, ...; [] if unconditional
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "generated")
    check_output_folder(out, dict(
        checkpoint=os.path.abspath(args.checkpoint), checkpoint_step=step, ema=not args.no_ema,
        steps=args.steps or diffusion.num_timesteps, ddim=args.ddim, eta=args.eta, seed=args.seed,
        batch_size=args.batch_size, device=device.type, precision=str(amp_dtype or torch.float32), classes=classes,
        guidance=args.guidance, low_res=os.path.abspath(args.low_res) if args.low_res else None))
    paths = [os.path.join(out, f"{n}.png") for n in range(1, args.num + 1)]  # image i is paths[i]
    batches = [range(start, min(start + args.batch_size, args.num)) for start in range(0, args.num, args.batch_size)]
    todo = [b for b, images in enumerate(batches) if not all(os.path.exists(paths[i]) for i in images)]
    shape = (args.batch_size, model.in_channels, config["image_size"], config["image_size"])
    sampler = classifier_free_guidance(model, args.guidance, len(known))  # the model itself when guidance = 0
    for b in tqdm(todo, desc=f"sampling {len(todo)} of {len(batches)} batches", unit="batch"):
        rows = range(b * args.batch_size, (b + 1) * args.batch_size)  # drawn in full, like the noise: i decides
        model_kwargs = {}
        if classes:
            model_kwargs["y"] = torch.tensor([known.index(classes[i % len(classes)]) for i in rows], device=device)
        if low_res_images is not None:  # (B, 3, S, S); past the last input, the rows take them again in turn
            model_kwargs["low_res"] = torch.stack([low_res_images[i % len(low_res_images)] for i in rows]).to(device)
        generator = torch.Generator(device).manual_seed(args.seed * 1_000_000 + b)  # x_T and every step's noise
        with util.autocast(device, amp_dtype):
            x = diffusion.sample(sampler, shape, steps=args.steps, ddim=args.ddim, eta=args.eta, device=device,
                                 model_kwargs=model_kwargs, generator=generator, progress=True)  # (B, 3, H, W)
        for i, pixels in zip(batches[b], util.to_uint8(x)):  # the last batch keeps only the images it needs
            save_png(pixels, paths[i])
    if classes:  # the output is itself a labelled dataset
        Path(out, "labels.txt").write_text("".join(f"{classes[i % len(classes)]}\n" for i in range(args.num)))
    print(f"wrote {args.num} images ({config['image_size']}x{config['image_size']}) to {out}")
    if args.npz:
        array = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])  # (N, H, W, 3)
        np.savez(args.npz + ".tmp.npz", arr_0=array)  # uint8 under arr_0: the layout of the reference evaluator
        os.replace(args.npz + ".tmp.npz", args.npz)
        print(f"wrote {args.npz}: {array.shape} {array.dtype}")


if __name__ == "__main__":
    main()

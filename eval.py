"""
Look at a trained model and measure it: its samples, how they form, and the paper's likelihood in bits/dim.

    python eval.py runs/emoji/ckpt.pt --steps 50 --ddim         # pictures into runs/emoji/eval/, 50 DDIM steps
    python eval.py runs/emoji/ckpt.pt --nll data/emoji_test     # and bits/dim on held-out images
    python eval.py runs/superres/ckpt.pt --steps 100 --data_dir data/emoji_test   # a super-resolution model

Writes into --out (default: eval/ beside the checkpoint), the same for the same --seed and kind of device:
    grid.png          16 samples, 4x4 (class-conditional: a class a row)
    process/N.png     sample N forming: x_{t-1} at 20 of its steps, from noise (left) to the image, labelled t
    pred_x0/N.png     the network's estimate x^_0 of the final image, from x_t at the same steps
    denoise.gif       the grid forming, step by step
    steps.png         the same noise sampled with K = 10, 25, 50, 100 and T steps (sec. 4), none above --steps
    guidance.png      class-conditional models: a row per class, the same noise at guidance w = 0, 1, 3, 5
    superres.png      super-resolution models: low-res | bicubic | model | original; the PSNRs are printed
    nll.csv, nll.png  with --nll: each term L_t of the variational bound, in bits/dim; the total is printed
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm import tqdm

import util
from diffusion import classifier_free_guidance
from sample import add_sampling_flags, load_for_sampling

STEPS_COMPARED = (10, 25, 50, 100)  # steps.png's columns, then T
ROWS = 8  # rows of steps.png, superres.png and (at most) guidance.png
GUIDANCE_WEIGHTS = (0, 1, 3, 5)  # guidance.png's columns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    add_sampling_flags(p)  # checkpoint, --steps, --ddim, --eta, --guidance, --no_ema, --precision, --device
    p.add_argument("--out", help="folder for the results (None: eval/ beside the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seeds the starting noise, every step's noise and --nll's")
    p.add_argument("--data_dir", help="super-resolution models: images to shrink and enlarge (None: the training set)")
    p.add_argument("--nll", metavar="DIR", help="also measure bits/dim on DIR's images (T fp32 network calls an image)")
    p.add_argument("--num", type=int, default=256, help="--nll and the PSNR: how many images, from 1.png on")
    p.add_argument("--batch_size", type=int, default=64, help="--nll and super-resolution: images per network call")
    return p.parse_args(argv)


def sample_keeping(diffusion, model, noise, steps, args, model_kwargs, keep=()):
    """x_0 (B, C, H, W) sampled from x_T = noise in `steps` steps, their noise seeded by --seed, and for each step
    index i in keep (0: the step from x_T) that step's (x_{t-1}, x^_0, t), all on the CPU."""
    generator = torch.Generator(noise.device).manual_seed(args.seed + 1)
    progressive = diffusion.sample_progressive(model, noise.shape, steps, args.ddim, args.eta, noise=noise,
                                               model_kwargs=model_kwargs, progress=True, generator=generator)
    kept = {}
    for i, out in enumerate(progressive):
        if i in keep:  # t + 1: the paper's t, one above diffusion.py's 0-based index
            kept[i] = (out["x"].float().cpu(), out["pred_x0"].float().cpu(), int(out["t"][0]) + 1)
    return out["x"].float().clamp(-1, 1).cpu(), kept


def save_columns(columns, labels, path, row_labels=()):
    """columns: (N, C, H, W) each -> one PNG, a column per entry, labelled on top, and a label left of each row."""
    images = torch.stack(columns, dim=1).flatten(0, 1)  # (N * columns, C, H, W), row by row
    util.save_image_grid(images, path, nrow=len(columns), column_labels=labels, row_labels=row_labels)


def make_pictures(diffusion, model, config, dataset, args, device, out):
    """grid.png, process/, pred_x0/, denoise.gif, steps.png, guidance.png; dataset: --data_dir's images, or None."""
    steps = args.steps or diffusion.num_timesteps
    size = config["image_size"]
    noise = torch.randn(16, model.in_channels, size, size, device=device,
                        generator=torch.Generator(device).manual_seed(args.seed))  # x_T of the 4 x 4 grid
    classes = config.get("classes") or []
    model_kwargs = {}
    if classes:  # row r of the grid is class r (in turn if there are fewer than 4)
        model_kwargs["y"] = (torch.arange(16, device=device) // 4) % len(classes)
    if dataset is not None:  # the grid enlarges the first 16 images of --data_dir (in turn if fewer)
        originals = torch.stack([dataset[i % len(dataset)] for i in range(16)]).to(device)
        model_kwargs["low_res"] = util.downsample(originals, config["super_res_from"])  # (16, 3, S, S)
    sampler = classifier_free_guidance(model, args.guidance, model.num_classes)  # the model itself when guidance = 0
    strip_steps = torch.linspace(0, steps - 1, min(20, steps)).round().int().tolist()  # both ends included
    gif_steps = torch.linspace(0, steps - 1, min(50, steps)).round().int().tolist()
    samples, kept = sample_keeping(diffusion, sampler, noise, steps, args, model_kwargs, set(strip_steps + gif_steps))
    row_names = [classes[int(y)] for y in model_kwargs["y"]] if classes else []  # (16,): a name for each sample
    util.save_image_grid(samples, os.path.join(out, "grid.png"), nrow=4, row_labels=row_names[::4])
    t_labels = [f"t={kept[i][2]}" for i in strip_steps]
    for folder, frame in (("process", 0), ("pred_x0", 1)):  # x_{t-1} or x^_0 of each kept step, side by side
        frames = torch.stack([kept[i][frame] for i in strip_steps], dim=1)  # (16, frames, C, H, W)
        for n, strip in enumerate(frames, start=1):
            util.save_image_grid(strip, os.path.join(out, folder, f"{n}.png"), nrow=len(strip),
                                 column_labels=t_labels, labels_below=True)
    gif = [util.image_grid(kept[i][0], nrow=4) for i in gif_steps]  # 80 ms a frame, the last one held for 2 s
    gif[0].save(os.path.join(out, "denoise.gif"), save_all=True, append_images=gif[1:],
                duration=[80] * (len(gif) - 1) + [2000], loop=0)
    counts = sorted({k for k in STEPS_COMPARED if k < steps} | {steps})  # none above --steps: T can take hours
    first_rows = {key: value[:ROWS] for key, value in model_kwargs.items()}
    print(f"steps.png: K = {', '.join(map(str, counts))} steps", file=sys.stderr)
    columns = [sample_keeping(diffusion, sampler, noise[:ROWS], k, args, first_rows)[0] if k < steps
               else samples[:ROWS] for k in counts]
    labels = [f"K={k}" if k < diffusion.num_timesteps else f"T={k}" for k in counts]
    save_columns(columns, labels, os.path.join(out, "steps.png"), row_names[:ROWS])
    if classes:  # guidance.png: a class a row (the first 8), the same noise at each weight w
        rows, guidance_steps = min(ROWS, len(classes)), args.steps or min(diffusion.num_timesteps, 100)
        print(f"guidance.png: sampling with {guidance_steps} steps at w = {GUIDANCE_WEIGHTS}", file=sys.stderr)
        y = {"y": torch.arange(rows, device=device)}
        columns = [sample_keeping(diffusion, classifier_free_guidance(model, w, model.num_classes), noise[:rows],
                                  guidance_steps, args, y)[0] for w in GUIDANCE_WEIGHTS]
        save_columns(columns, [f"w={w:g}" for w in GUIDANCE_WEIGHTS], os.path.join(out, "guidance.png"),
                     classes[:rows])


def psnr(x, reference):
    """10 log10(255^2 / MSE) in dB of each image x (B, C, H, W) against reference, on their 8-bit PNG pixels."""
    mse = (util.to_uint8(x).float() - util.to_uint8(reference).float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(255 ** 2 / mse)


def compare_super_resolution(diffusion, model, config, dataset, args, device, out):
    """superres.png for the first 8 images of --data_dir, PSNRs over the first --num. A sample is one plausible
    image, not the mean of them all that minimises the squared error: PSNR rewards blur, so judge the pictures too."""
    size, low = config["image_size"], config["super_res_from"]
    originals = torch.stack([dataset[i] for i in range(min(args.num, len(dataset)))])  # (num, 3, H, W)
    low_res = util.downsample(originals, low)  # (num, 3, S, S)
    generator = torch.Generator(device).manual_seed(args.seed)
    print(f"superres.png: enlarging {len(originals)} images of {args.data_dir}", file=sys.stderr)
    samples = []
    for batch in low_res.split(args.batch_size):
        noise = torch.randn(len(batch), 3, size, size, device=device, generator=generator)
        samples.append(sample_keeping(diffusion, model, noise, args.steps, args, {"low_res": batch.to(device)})[0])
    columns = {"bilinear": F.interpolate(low_res, size=(size, size), mode="bilinear"),
               "bicubic": F.interpolate(low_res, size=(size, size), mode="bicubic").clamp(-1, 1),
               "model": torch.cat(samples)}
    blocky = F.interpolate(low_res, size=(size, size), mode="nearest")  # the input as it is: big pixels
    save_columns([blocky[:ROWS], columns["bicubic"][:ROWS], columns["model"][:ROWS], originals[:ROWS]],
                 [f"{low}x{low}", "bicubic", "model", "original"], os.path.join(out, "superres.png"))
    print(f"PSNR against the originals, mean over {len(originals)} images of {args.data_dir}: " +
          ", ".join(f"{name} {psnr(images, originals).mean():.2f} dB" for name, images in columns.items()))


def measure_nll(diffusion, model, config, dataset, args, device, out):
    """The whole variational bound (every L_t and L_T) in bits/dim on --nll's images: -log p(x0) or -log p(x0 | low)."""
    images = torch.stack([dataset[i] for i in range(min(args.num, len(dataset)))]).to(device)  # (num, 3, H, W)
    num, T = len(images), diffusion.num_timesteps
    torch.manual_seed(args.seed)  # bpd draws a fresh x_t for every term
    # fp32 through and through: the terms at small t compare means that differ by less than bf16 or TF32 resolve
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    try:
        with tqdm(total=num * T, desc="bits/dim (images x T)", unit="call", unit_scale=True) as progress:
            for x0 in images.split(args.batch_size):
                model_kwargs = {}
                if model.num_classes is not None:  # without a class: the null label that label dropout trained
                    model_kwargs["y"] = torch.full((len(x0),), model.num_classes, device=device)
                if config.get("super_res_from"):
                    model_kwargs["low_res"] = util.downsample(x0, config["super_res_from"])  # (B, 3, S, S)
                results.append(diffusion.bpd(model, x0, model_kwargs=model_kwargs, progress=progress))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    result = {key: torch.cat([r[key].cpu().double() for r in results]) for key in results[0]}
    total, prior = result["total_bpd"], result["prior_bpd"]  # (num,)
    vb, mse = result["vb"].mean(dim=0), result["mse"].mean(dim=0)  # (T,): each term's mean over the images
    rows = "".join(f"{t},{vb[t]:.9g},{mse[t]:.9g}\n" for t in range(T))  # t = 0: the decoder term L_0
    Path(out, "nll.csv").write_text("t,vb_bpd,mse\n" + rows)
    ax = Figure(figsize=(7, 4)).subplots()
    ax.plot(range(T), vb.numpy())
    ax.set(xlabel="t (0 = the decoder term L_0)", ylabel="L_t, bits/dim", yscale="log",
           title=f"terms of the variational bound, {num} images of {args.nll}")
    ax.figure.savefig(os.path.join(out, "nll.png"), dpi=100)
    standard_error = total.std() / math.sqrt(num) if num > 1 else float("nan")
    print(f"bits/dim on {num} images of {args.nll}: {total.mean():.4f} ± {standard_error:.4f} (standard error)")
    print(f"  prior L_T: {prior.mean():.3e}   decoder L_0: {vb[0]:.4f}   "
          f"L_1 ... L_{T - 1}: {vb[1:].sum():.4f}   (sum of the terms in nll.csv + prior = total)")


def main(argv=None):
    args = parse_args(argv)
    model, diffusion, config, step, device, amp_dtype = load_for_sampling(args)
    if args.num < 1 or args.batch_size < 1:
        raise SystemExit(f"error: --num {args.num} and --batch_size {args.batch_size} must be at least 1")
    if args.data_dir and not config.get("super_res_from"):
        raise SystemExit(f"error: --data_dir is for super-resolution models; {args.checkpoint} was trained without "
                         f"--super_res_from")
    if config.get("super_res_from") and args.data_dir is None:
        args.data_dir = config["data_dir"]  # the training images
    try:  # a bad folder is found before minutes of sampling, not after
        dataset = util.NumberedImages(args.data_dir, config["image_size"]) if args.data_dir else None
        nll_dataset = util.NumberedImages(args.nll, config["image_size"]) if args.nll else None
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    os.makedirs(out, exist_ok=True)
    print(f"{args.checkpoint}: step {step}, {'raw' if args.no_ema else 'EMA'} weights, {device}, autocast {amp_dtype}, "
          f"{args.steps or diffusion.num_timesteps} {'DDIM' if args.ddim else 'ancestral'} steps", file=sys.stderr)
    with util.autocast(device, amp_dtype):
        make_pictures(diffusion, model, config, dataset, args, device, out)
        if dataset is not None:
            compare_super_resolution(diffusion, model, config, dataset, args, device, out)
    if args.nll:  # in fp32, whatever --precision says: the small-t terms need it
        measure_nll(diffusion, model, config, nll_dataset, args, device, out)
    print(f"wrote the pictures{' and nll.csv, nll.png' if args.nll else ''} to {out}")


if __name__ == "__main__":
    main()

"""
Look at a trained model and measure it: its samples, how they form, and the paper's likelihood in bits/dim.

    python eval.py runs/emoji/ckpt.pt                           # pictures into runs/emoji/eval/
    python eval.py runs/emoji/ckpt.pt --steps 50 --ddim         # the same with 50 DDIM steps
    python eval.py runs/emoji/ckpt.pt --nll data/emoji_test     # and bits/dim on held-out images
    python eval.py runs/superres/ckpt.pt --steps 100 --data_dir data/emoji_test   # a super-resolution model

Everything goes into --out (default: eval/ beside the checkpoint):
    grid.png          16 samples, 4x4
    process/N.png     how sample N forms: about 20 of its steps, from noise (left) to the image (right), each
                      frame labelled with the step's t (1-based, T ... 1): x_{t-1}, what the step from x_t made
    pred_x0/N.png     the network's estimate of the final image, x^_0, from x_t at the same steps
    denoise.gif       the grid forming, step by step
    steps.png         the same starting noise sampled with K = 10, 25, 50, 100 and all T steps, a column per K,
                      none above --steps (so that --steps bounds the time): learned variances keep most of the
                      quality at few steps (sec. 4)
    guidance.png      class-conditional models: a row per class, the same noise at guidance w = 0, 1, 3, 5
                      (100 steps, or --steps); their grid has a row per class
    superres.png      super-resolution models: rows of low-res | bicubic | model | original for images of
                      --data_dir, and the PSNR of each against the original (printed); their grid.png,
                      process/ and steps.png enlarge the first 16 of those images
    nll.csv, nll.png  with --nll: each term L_t of the variational bound, in bits/dim, against t

The model, the process and the EMA weights come from the checkpoint: no other flag is needed. The same --seed
gives the same pictures (on the same kind of device).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import util
from diffusion import classifier_free_guidance

GRID_SIZE = 16  # samples in grid.png, 4 x 4
STRIP_FRAMES = 20  # frames in each process/ and pred_x0/ strip
GIF_FRAMES = 50  # frames of denoise.gif
STEPS_COMPARED = (10, 25, 50, 100)  # steps.png's columns, then T
STEPS_ROWS = 8  # samples (rows) in steps.png
GUIDANCE_WEIGHTS = (0, 1, 3, 5)  # guidance.png's columns (class-conditional models)
GUIDANCE_STEPS = 100  # guidance.png's sampling steps, unless --steps says otherwise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    util.add_sampling_flags(p)  # checkpoint, --steps, --ddim, --eta, --guidance, --no_ema, --precision, --device
    p.add_argument("--out", default=None, help="folder for the results (None: eval/ beside the checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seeds the starting noise, every step's noise and --nll's")
    p.add_argument("--data_dir", default=None,
                   help="super-resolution models: the images to shrink and enlarge again, 1.png ... N.png (None: "
                   "the training folder named in the checkpoint; held-out images, e.g. data/emoji_test, say more)")
    p.add_argument("--nll", default=None, metavar="DATA_DIR",
                   help="also measure the variational bound in bits/dim (all T terms and the prior) on the images "
                   "1.png ... N.png of DATA_DIR, e.g. data/emoji_test: T network calls per image, in fp32 whatever "
                   "--precision says, as the small-t terms need it")
    p.add_argument("--num", type=int, default=256,
                   help="--nll and super-resolution's PSNR: how many of the folder's images, from 1.png on (all of "
                   "them if fewer)")
    p.add_argument("--batch_size", type=int, default=64, help="--nll and super-resolution: images per network call")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Sampling, with the intermediate steps kept


def evenly_spaced(num_steps, count):
    """count indices (all of them if there are fewer) from 0 to num_steps - 1, both ends included."""
    count = min(count, num_steps)
    return sorted({round(i * (num_steps - 1) / max(count - 1, 1)) for i in range(count)})


def sample_keeping(diffusion, model, noise, steps, args, keep=(), model_kwargs=None):
    """Sample from x_T = noise with `steps` steps. Returns the final x_0 (B, C, H, W) and, for every step index
    in keep (0 = the first step, from x_T), that step's x_{t-1}, x^_0 (on the CPU) and t. The steps' noise comes from
    a generator seeded by --seed, so different step counts start from the same x_T and the same seed.
    model_kwargs: the condition, {"y": classes (B,)} or {"low_res": (B, 3, H, W)}, or None."""
    generator = torch.Generator(noise.device).manual_seed(args.seed + 1)
    kept = {}
    for i, out in enumerate(diffusion.sample_progressive(model, noise.shape, steps, args.ddim, args.eta, noise=noise,
                                                         model_kwargs=model_kwargs, progress=True,
                                                         generator=generator)):
        if i in keep:  # t: the 0-based index of diffusion.py, one below the paper's
            kept[i] = (out["x"].float().cpu(), out["pred_x0"].float().cpu(), int(out["t"][0]) + 1)
    return out["x"].clamp(-1, 1), kept


def save_strips(frames, labels, folder):
    """frames: (F, B, C, H, W) -> folder/1.png ... B.png, each the F frames of one sample side by side, labels
    under them."""
    for n in range(frames.shape[1]):
        util.save_image_grid(frames[:, n], os.path.join(folder, f"{n + 1}.png"), nrow=frames.shape[0],
                             column_labels=labels, labels_below=True)


def save_gif(frames, path, nrow):
    """frames: (F, B, C, H, W) -> an animated GIF of the grid, 80 ms a frame, the last one held for 2 s."""
    images = [util.image_grid(frame, nrow) for frame in frames]
    durations = [80] * (len(images) - 1) + [2000]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


def save_labelled_columns(columns, labels, path, row_labels=()):
    """columns: list of (N, C, H, W) in [-1, 1] -> one PNG, a column per entry with its label on top (and a label
    left of each row, if given)."""
    images = torch.stack(columns, dim=1).flatten(0, 1)  # (N * columns, C, H, W), row by row
    util.save_image_grid(images, path, nrow=len(columns), column_labels=labels, row_labels=row_labels)


def make_pictures(diffusion, model, config, dataset, args, device, amp_dtype, out):
    """grid.png, process/, pred_x0/, denoise.gif, steps.png and guidance.png. dataset: --data_dir's images, which
    a super-resolution model enlarges after shrinking them (None for other models)."""
    T = diffusion.num_timesteps
    steps = args.steps or T
    channels, size = model.in_channels, config["image_size"]
    noise_generator = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(GRID_SIZE, channels, size, size, device=device, generator=noise_generator)  # x_T
    classes = config.get("classes")
    model_kwargs = {}
    if classes:  # row r of the 4 x 4 grid is class r (the first four classes; in turn if there are fewer)
        model_kwargs["y"] = (torch.arange(GRID_SIZE, device=device) // 4) % len(classes)
    if config.get("super_res_from"):  # the grid enlarges the first 16 images of --data_dir (in turn if fewer)
        originals = torch.stack([dataset[i % (len(dataset) // 2)] for i in range(GRID_SIZE)]).to(device)
        low_res = util.downsample(originals, config["super_res_from"])
        model_kwargs["low_res"] = util.upsample(low_res, size)  # (16, 3, H, W)
    sampler = classifier_free_guidance(model, args.guidance, len(classes or []))  # model itself when guidance = 0
    strip_steps, gif_steps = evenly_spaced(steps, STRIP_FRAMES), evenly_spaced(steps, GIF_FRAMES)
    print(f"sampling {GRID_SIZE} images with {steps} {'DDIM' if args.ddim else 'ancestral'} steps", file=sys.stderr)
    with util.autocast(device, amp_dtype):
        samples, kept = sample_keeping(diffusion, sampler, noise, steps, args, keep=set(strip_steps) | set(gif_steps),
                                       model_kwargs=model_kwargs)
    row_classes = [classes[int(y)] for y in model_kwargs["y"][::4]] if classes else []  # one class a row
    util.save_image_grid(samples, os.path.join(out, "grid.png"), nrow=4, row_labels=row_classes)
    xs = torch.stack([kept[i][0] for i in strip_steps])  # (frames, 16, C, H, W); the last frame is the sample
    pred_x0s = torch.stack([kept[i][1] for i in strip_steps])
    t_labels = [f"t={kept[i][2]}" for i in strip_steps]
    save_strips(xs, t_labels, os.path.join(out, "process"))
    save_strips(pred_x0s, t_labels, os.path.join(out, "pred_x0"))
    save_gif(torch.stack([kept[i][0] for i in gif_steps]), os.path.join(out, "denoise.gif"), nrow=4)

    first_rows = {key: value[:STEPS_ROWS] for key, value in model_kwargs.items()}
    save_steps_comparison(diffusion, sampler, noise[:STEPS_ROWS], first_rows, steps, samples[:STEPS_ROWS], args,
                          device, amp_dtype, os.path.join(out, "steps.png"),
                          [classes[int(y)] for y in first_rows["y"]] if classes else [])
    if classes:
        rows = min(8, len(classes))  # a row per class, the first 8
        save_guidance_comparison(diffusion, model, noise[:rows], torch.arange(rows, device=device),
                                 args.steps or min(T, GUIDANCE_STEPS), args, device, amp_dtype,
                                 os.path.join(out, "guidance.png"), classes[:rows])


def save_steps_comparison(diffusion, sampler, noise, model_kwargs, steps, samples, args, device, amp_dtype, path,
                          row_labels):
    """steps.png, the paper's sec. 4 in one picture: every column starts from the same x_T = noise and samples
    with K = 10, 25, 50, 100 and T steps, but never more than `steps` (--steps, or T): on a CPU, T steps of a large
    model take hours. samples: those already drawn with `steps` steps. row_labels: each row's class, or nothing."""
    T = diffusion.num_timesteps
    counts = sorted({k for k in STEPS_COMPARED if k < steps} | {steps})
    columns = []
    for k in counts:
        if k == steps:
            columns.append(samples)
            continue
        print(f"steps.png: sampling with {k} steps", file=sys.stderr)
        with util.autocast(device, amp_dtype):
            columns.append(sample_keeping(diffusion, sampler, noise, k, args, model_kwargs=model_kwargs)[0])
    labels = [f"K={k}" if k < T else f"T={k}" for k in counts]
    save_labelled_columns([column.float().cpu() for column in columns], labels, path, row_labels)


def save_guidance_comparison(diffusion, model, noise, y, steps, args, device, amp_dtype, path, class_names):
    """guidance.png: the classes y (named class_names), one a row, from the same noise at each guidance weight, one
    a column."""
    print(f"guidance.png: sampling with {steps} steps at w = {GUIDANCE_WEIGHTS}", file=sys.stderr)
    columns = []
    for w in GUIDANCE_WEIGHTS:
        with util.autocast(device, amp_dtype):
            guided = classifier_free_guidance(model, w, model.num_classes)
            samples = sample_keeping(diffusion, guided, noise, steps, args, model_kwargs={"y": y})[0]
        columns.append(samples.float().cpu())
    save_labelled_columns(columns, [f"w={w:g}" for w in GUIDANCE_WEIGHTS], path, class_names)


# ----------------------------------------------------------------------------------------------------------
# Super-resolution: the model against interpolation


def psnr(x, reference):
    """Peak signal-to-noise ratio in dB of each image x against reference, both (B, C, H, W) in [-1, 1], on the
    8-bit pixels their PNGs hold: 10 log10(255^2 / MSE). Higher is closer; identical images give inf."""
    mse = (util.to_uint8(x).float() - util.to_uint8(reference).float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(255 ** 2 / mse)


def compare_super_resolution(diffusion, model, config, dataset, args, device, amp_dtype, out):
    """superres.png: rows of low-res input (big pixels) | bicubic | the model's sample | original, for the first
    8 images of --data_dir; and the mean PSNR of bilinear, bicubic and the model against the originals over its
    first --num images. A sample is one plausible large image, not the average of all of them that minimises the
    squared error, so expect it to look sharper than bicubic and still lose to it on PSNR."""
    size, low_res_size = config["image_size"], config["super_res_from"]
    num, steps = min(args.num, len(dataset) // 2), args.steps or diffusion.num_timesteps
    columns = {"low-res": [], "bilinear": [], "bicubic": [], "model": [], "original": []}
    noise_generator = torch.Generator(device).manual_seed(args.seed)
    print(f"superres.png: enlarging {num} images of {args.data_dir} with {steps} steps", file=sys.stderr)
    for start in range(0, num, args.batch_size):
        originals = torch.stack([dataset[i] for i in range(start, min(start + args.batch_size, num))]).to(device)
        low_res = util.downsample(originals, low_res_size)  # (B, 3, S, S)
        condition = util.upsample(low_res, size)  # (B, 3, H, W): bilinear, what the model is given
        noise = torch.randn(originals.shape, device=device, generator=noise_generator)
        with util.autocast(device, amp_dtype):
            samples = sample_keeping(diffusion, model, noise, steps, args, model_kwargs={"low_res": condition})[0]
        columns["low-res"].append(F.interpolate(low_res, size=(size, size), mode="nearest").cpu())
        columns["bilinear"].append(condition.cpu())
        columns["bicubic"].append(F.interpolate(low_res, size=(size, size), mode="bicubic").clamp(-1, 1).cpu())
        columns["model"].append(samples.float().cpu())
        columns["original"].append(originals.cpu())
    columns = {name: torch.cat(images) for name, images in columns.items()}  # (num, 3, H, W) each
    scores = {name: psnr(columns[name], columns["original"]).mean().item() for name in ("bilinear", "bicubic", "model")}
    shown = ("low-res", "bicubic", "model", "original")
    save_labelled_columns([columns[name][:STEPS_ROWS] for name in shown],
                          [f"{low_res_size}x{low_res_size}", "bicubic", "model", "original"],
                          os.path.join(out, "superres.png"))
    print(f"PSNR against the originals, mean over {num} images of {args.data_dir}: " +
          ", ".join(f"{name} {value:.2f} dB" for name, value in scores.items()))
    return scores


# ----------------------------------------------------------------------------------------------------------
# Likelihood: the full variational bound (eq. 4-6), in bits/dim


def measure_nll(diffusion, model, config, dataset, args, device, out):
    """dataset: util.NumberedImages of --nll's folder, (3, size, size) in [-1, 1]. A super-resolution model's
    bound is conditional: -log p(x0 | its low-res version), in bits/dim."""
    num = min(args.num, len(dataset) // 2)  # the first half of the dataset's indices: the images, not mirrored
    T = diffusion.num_timesteps
    torch.manual_seed(args.seed)  # bpd draws a fresh x_t for every term
    # fp32 through and through: the terms at small t compare means that differ by less than bf16 or TF32 resolve
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    totals, priors, vb_sums, mse_sums = [], [], torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    progress = tqdm(total=num * T, desc="bits/dim (images x T)", unit="call", unit_scale=True, dynamic_ncols=True)
    for start in range(0, num, args.batch_size):
        x0 = torch.stack([dataset[i] for i in range(start, min(start + args.batch_size, num))]).to(device)
        model_kwargs = {}
        if model.num_classes is not None:  # measured without a class: the null label its label dropout trained
            model_kwargs["y"] = torch.full((len(x0),), model.num_classes, device=device)
        if config.get("super_res_from"):
            model_kwargs["low_res"] = util.upsample(util.downsample(x0, config["super_res_from"]), x0.shape[-1])
        result = diffusion.bpd(model, x0, model_kwargs=model_kwargs, progress=progress)  # vb, mse: (B, T); (B,)
        totals.append(result["total_bpd"].cpu())
        priors.append(result["prior_bpd"].cpu())
        vb_sums += result["vb"].sum(dim=0).cpu().double()
        mse_sums += result["mse"].sum(dim=0).cpu().double()
    progress.close()
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    totals, priors = torch.cat(totals).double(), torch.cat(priors).double()
    vb_means, mse_means = vb_sums / num, mse_sums / num

    with open(os.path.join(out, "nll.csv"), "w") as f:
        f.write("t,vb_bpd,mse\n")  # t = 0 is the decoder term L_0; mean over the images
        for t in range(T):
            f.write(f"{t},{vb_means[t]:.9g},{mse_means[t]:.9g}\n")
    plot_nll(vb_means, os.path.join(out, "nll.png"), f"{num} images of {args.nll}")
    standard_error = totals.std() / math.sqrt(num) if num > 1 else float("nan")
    print(f"bits/dim on {num} images of {args.nll}: {totals.mean():.4f} ± {standard_error:.4f} (standard error)")
    print(f"  prior L_T: {priors.mean():.3e}   decoder L_0: {vb_means[0]:.4f}   "
          f"L_1 ... L_{T - 1}: {vb_means[1:].sum():.4f}   (sum of the terms in nll.csv + prior = total)")


def plot_nll(vb_means, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed, so no nll.png: pip install matplotlib", file=sys.stderr)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(vb_means)), vb_means.numpy())
    ax.set(xlabel="t (0 = the decoder term L_0)", ylabel="L_t, bits/dim", yscale="log",
           title=f"terms of the variational bound, {title}")
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    model, diffusion, config, step, device, amp_dtype = util.load_for_sampling(args)
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
    print(f"{args.checkpoint}: step {step}, {'EMA' if not args.no_ema else 'raw'} weights, {device}, "
          f"autocast {amp_dtype}", file=sys.stderr)

    torch.manual_seed(args.seed)
    make_pictures(diffusion, model, config, dataset, args, device, amp_dtype, out)
    if config.get("super_res_from"):
        compare_super_resolution(diffusion, model, config, dataset, args, device, amp_dtype, out)
    if args.nll:
        measure_nll(diffusion, model, config, nll_dataset, args, device, out)
    extra = ((", guidance.png" if config.get("classes") else "") + (", superres.png" if dataset else "") +
             (", nll.csv, nll.png" if args.nll else ""))
    print(f"wrote grid.png, process/, pred_x0/, denoise.gif, steps.png{extra} to {out}")


if __name__ == "__main__":
    main()

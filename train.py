"""
Train an Improved DDPM (Nichol & Dhariwal 2021) on a folder of numbered PNGs 1.png ... N.png.

    python train.py        # the CPU demo on the bundled emoji, 32x32: on 2 cores about 12 minutes with AVX-512
                           # BF16 or AMX, about 35 with AVX2 only
    sh train.sh            # the 64x64 anime-faces recipe, in the background, on every GPU there is
    torchrun --standalone --nproc_per_node=gpu train.py --data_dir AnimeFaces64 --out_dir runs/anime64 ...
                           # several GPUs by hand (DistributedDataParallel), with the recipe's flags of train.sh

Everything lands in --out_dir: ckpt.pt (model, EMA, optimiser, config: enough to resume or sample), the one before
it as ckpt.prev.pt, log.csv, loss.png and samples/STEP.png. A run resumes from OUT/ckpt.pt when it exists (from
ckpt.prev.pt if ckpt.pt is damaged). SIGTERM or Ctrl-C saves and exits.
Then look at the model with `python eval.py OUT/ckpt.pt`, or generate images with `python sample.py OUT/ckpt.pt`.
"""
import argparse
import contextlib
import copy
import csv
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

import util


def int_list(text):
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    on_off = argparse.BooleanOptionalAction
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", default="data/emoji",
                   help="folder of 1.png ... N.png (make one with `python util.py prepare`)")
    g.add_argument("--image_size", type=int, default=32, help="images of another size are centre-cropped and resized")
    g.add_argument("--num_workers", type=int, default=2,
                   help="DataLoader worker processes per GPU (0 = load in the main process)")
    g.add_argument("--class_cond", action=on_off, default=False,
                   help="class-conditional: read each image's class from DATA_DIR/labels.txt (util.py prepare "
                   "--labels writes it); sample.py --class then asks for a class")
    g.add_argument("--class_dropout", type=float, default=0.1,
                   help="with --class_cond, replace a label by the null label with this probability, so that one "
                   "model also samples without a class: classifier-free guidance needs both (Ho & Salimans 2022)")
    g.add_argument("--super_res_from", type=int, default=None, metavar="S",
                   help="super-resolution: condition on the image shrunk to S x S (util.downsample) and enlarged "
                   "back (bilinear), so that the model learns to make IMAGE_SIZE images from S x S ones; sample "
                   "with sample.py --low_res (None: an unconditional model)")
    g = p.add_argument_group("model (unet.py)")
    g.add_argument("--base_channels", type=int, default=32,
                   help="channels at full resolution; the main knob for model size")
    g.add_argument("--channel_mult", type=int_list, default=(1, 2, 2, 2),
                   help="channel multiplier per resolution, e.g. 1,2,3,4; one level per entry, each halving the size")
    g.add_argument("--num_res_blocks", type=int, default=1, help="residual blocks per resolution")
    g.add_argument("--attention_resolutions", type=int_list, default=(8,),
                   help="feature-map sizes with self-attention, e.g. 16,8")
    g.add_argument("--num_heads", type=int, default=4, help="attention heads")
    g.add_argument("--min_group_channels", type=int, default=4,
                   help="GroupNorm: DDPM's 32 groups, halved until each holds at least this many channels. Groups of "
                   "one channel (1 = DDPM's rule, which gives those at 32 channels) erase the image's colour; the "
                   "paper's models (128+ channels) are the same with 1 or 4")
    g.add_argument("--dropout", type=float, default=0.1,
                   help="dropout in residual blocks (0.1-0.3 helps small data sets)")
    g = p.add_argument_group("diffusion (diffusion.py)")
    g.add_argument("--num_timesteps", type=int, default=1000,
                   help="T, the number of noising steps (paper: 1000 or 4000)")
    g.add_argument("--noise_schedule", choices=("cosine", "linear"), default="cosine",
                   help="cosine (eq. 17) or DDPM's linear")
    g.add_argument("--learn_sigma", action=on_off, default=True, help="learn the reverse-process variances (eq. 15)")
    g.add_argument("--loss_type", choices=("hybrid", "mse", "kl"), default="hybrid",
                   help="hybrid = L_simple + 0.001 L_vlb (eq. 16); kl = L_vlb alone; mse = L_simple, plus L_t "
                   "unweighted (not 0.001 T) to train the variances when --learn_sigma, as the reference code does")
    g.add_argument("--importance_sampling", action=on_off, default=False,
                   help="sample t with p_t ∝ sqrt(E[L_t^2]) (eq. 18); meant for --loss_type kl")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32, help="images per GPU (or per CPU process) per step")
    g.add_argument("--lr", type=float, default=3e-4,
                   help="AdamW learning rate (paper: 1e-4 for 64x64, 2e-4 for small models)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up from 0")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 = off)")
    g.add_argument("--ema_rate", type=float, default=0.9999,
                   help="EMA decay; warmed up as min(rate, (1+step)/(10+step))")
    g.add_argument("--max_steps", type=int, default=2000,
                   help="stop after this many optimiser steps in all (counts across resumes)")
    g.add_argument("--max_minutes", type=float, default=0,
                   help="also save and stop after this many minutes of this process (0 = no limit; the clock "
                        "starts again at each resume): a rented-GPU budget")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and noise")
    g = p.add_argument_group("memory: the same training in less GPU memory, for more compute (see the README's table)")
    g.add_argument("--microbatch", type=int, default=None, metavar="M",
                   help="run each step's --batch_size images in chunks of M, one after another, accumulating the "
                   "gradients: the same step (t and the noise are drawn for the whole batch) with the activations "
                   "of M images in memory at a time. M must divide --batch_size (None: the whole batch at once)")
    g.add_argument("--checkpointing", action=on_off, default=False,
                   help="activation checkpointing: keep only each residual and attention block's input for the "
                   "backward, and run the block again there")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="runs/emoji",
                   help="checkpoints, logs and samples go here; resumes from OUT/ckpt.pt (or OUT/ckpt.prev.pt, the "
                   "one saved before it, when ckpt.pt is damaged)")
    g.add_argument("--save_every", type=int, default=500,
                   help="write OUT/ckpt.pt every N steps (also at the end and on SIGTERM/Ctrl-C)")
    g.add_argument("--sample_every", type=int, default=500,
                   help="write a grid of EMA samples (50 respaced steps) every N steps (0 = only at the end)")
    g.add_argument("--num_samples", type=int, default=36, help="images in each sample grid")
    g.add_argument("--log_every", type=int, default=50,
                   help="append to OUT/log.csv and redraw OUT/loss.png every N steps")
    g.add_argument("--tensorboard", action=on_off, default=False,
                   help="also write log.csv's figures and the sample grids to OUT/tensorboard/; watch them with "
                   "`tensorboard --logdir OUT` (pip install tensorboard)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 where the hardware has it (GPUs from Ampere on, CPUs with AVX-512 BF16 "
                   "or AMX), else fp16 with a gradient scaler on a GPU, else fp32. bf16 elsewhere is emulated: slow. "
                   "fp16 on the CPU rehearses the GPU path, slowly")
    g.add_argument("--max_skipped_steps", type=int, default=20,
                   help="fp16: the gradient scaler skips a step whose loss or gradients are not finite and lowers its "
                   "scale; this many skipped steps in a row stop the run, without saving. fp32 and bf16 have no "
                   "scaler: there the first non-finite loss or gradient stops the run, without saving")
    g.add_argument("--compile", action=on_off, default=False,
                   help="torch.compile the model (faster on GPU after a minute of compiling)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on stopping, under torchrun
# OUT/log.csv: averages over a log interval's steps whose loss and gradients were finite; skipped counts the others
LOG_COLUMNS = ("step", "loss", "mse", "vb", "lr", "grad_norm", "images_per_s", "elapsed_s", "skipped", "loss_scale")

# The checkpoint must match the model and process these flags build; the others may change between resumes.
ARCHITECTURE = ("image_size", "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                "num_timesteps", "noise_schedule", "learn_sigma", "loss_type", "importance_sampling", "class_cond",
                "classes", "super_res_from", "min_group_channels")


# ----------------------------------------------------------------------------------------------------------
# Data: the images come from util.NumberedImages (eval.py reads the same folders); here, only their order


class ShuffleForever(torch.utils.data.Sampler):
    """Dataset indices reshuffled every epoch, forever. The order depends only on the seed, so a run resumed at
    step s skips the s * batch_size indices already used. Under DDP rank r takes every world_size-th index."""

    def __init__(self, size, seed, start=0, rank=0, world_size=1):
        self.size, self.seed, self.start, self.rank, self.world_size = size, seed, start, rank, world_size

    def __iter__(self):
        per_rank = self.size // self.world_size  # the same count on every rank, so no rank waits for another
        epoch, offset = divmod(self.start, per_rank)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[self.rank::self.world_size][:per_rank][offset:].tolist()
            epoch, offset = epoch + 1, 0


def device_batches(dataset, args, device, step, rank, world_size):
    """(x0, y) batches on the device, forever, in the order the seed sets, from where a run stopped at `step` was:
    x0 (B, 3, H, W) in [-1, 1] (channels last on a GPU), y (B,) class labels, or None."""
    sampler = ShuffleForever(len(dataset), args.seed, start=step * args.batch_size, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0, drop_last=True)
    batches = iter(loader)  # now, not at the first batch: it draws the workers' seed from the random stream

    def on_device():
        for batch in batches:
            x0, y = batch if args.class_cond else (batch, None)
            x0 = x0.to(device, non_blocking=True)
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            yield x0, y if y is None else y.to(device, non_blocking=True)

    return on_device()


# ----------------------------------------------------------------------------------------------------------
# Outputs


def save_samples(ema, diffusion, config, step, device, dataset, tensorboard=None):
    """OUT/samples/STEP.png (and TensorBoard's "samples", if on): a grid of EMA samples drawn with 50 respaced
    steps (sec. 4), quick and close to the quality of all T steps when the variances are learned. Class-conditional:
    a row per class (the first 8). Super-resolution: the first training images, in rows of three: low-res input,
    the model's sample, original."""
    num, nrow, model_kwargs, row_labels = config["num_samples"], None, {}, []
    size, low_res_size = config["image_size"], config["super_res_from"]
    if config["classes"]:
        rows = min(8, len(config["classes"]))
        nrow = max(1, num // rows)
        num = rows * nrow
        model_kwargs["y"] = torch.arange(rows, device=device).repeat_interleave(nrow)  # row r: class r
        row_labels = config["classes"][:rows]
    if low_res_size:
        nrow = max(1, math.isqrt(min(num, len(dataset) // 2)))
        num = nrow * (min(num, len(dataset) // 2) // nrow)  # whole rows
        originals = torch.stack([dataset[i] for i in range(num)]).to(device)  # (num, 3, H, W), not mirrored
        low_res = util.downsample(originals, low_res_size)  # (num, 3, S, S)
        model_kwargs["low_res"] = util.upsample(low_res, size)
    # Sampling must not change the training run's random stream, so it runs on a forked, restored one.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        torch.manual_seed(config["seed"])  # the same noise every time: the grids show the model improving
        samples = diffusion.sample(ema, (num, 3, size, size), steps=min(50, diffusion.num_timesteps), device=device,
                                   model_kwargs=model_kwargs)  # (num, 3, H, W) in [-1, 1]
    if low_res_size:
        blocky = F.interpolate(low_res, size=(size, size), mode="nearest")  # the input as it is: big pixels
        triples = torch.stack([blocky, samples.float(), originals]).unflatten(1, (-1, nrow))  # (3, rows, nrow, ...)
        samples = triples.transpose(0, 1).flatten(0, 2)  # rows in threes: low-res, sample, original
        row_labels = [f"{low_res_size}x{low_res_size}", "sample", "original"] * (num // nrow)
    path = os.path.join(config["out_dir"], "samples", f"{step:06d}.png")
    grid = util.save_image_grid(samples, path, nrow=nrow, row_labels=row_labels)
    if tensorboard is not None:  # the grid as saved, labels and all: (3, H, W) uint8
        tensorboard.add_image("samples", pil_to_tensor(grid), step)
        tensorboard.flush()


def open_log(out_dir, step):
    """OUT/log.csv with its header; on resume, the rows up to the checkpoint's step (a run killed after its last
    save logged steps that this one redoes)."""
    log_path = os.path.join(out_dir, "log.csv")
    kept = []
    if step and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f.readlines()[1:] if int(line.split(",")[0]) <= step]
    with open(log_path, "w") as f:
        f.write(",".join(LOG_COLUMNS) + "\n" + "".join(kept))


def open_tensorboard(out_dir, step):
    """A SummaryWriter into OUT/tensorboard/, or None, with one line, when the tensorboard package is missing. On
    resume, TensorBoard hides what an earlier run logged from `step` on (purge_step): this run redoes those steps."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return print("tensorboard is not installed, so no OUT/tensorboard/: pip install tensorboard", file=sys.stderr)
    return SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step or None)


def write_log(row, out_dir, tensorboard):
    """A row of log.csv (text by column), appended to OUT/log.csv and to TensorBoard (if on); loss.png redrawn."""
    with open(os.path.join(out_dir, "log.csv"), "a") as f:
        f.write(",".join(row[column] for column in LOG_COLUMNS) + "\n")
    if tensorboard is not None:
        for column in LOG_COLUMNS[1:]:
            if row[column]:  # "": no vb, no loss scale, or every step of the interval skipped
                tensorboard.add_scalar(f"train/{column}", float(row[column]), int(row["step"]))
        tensorboard.flush()
    plot_losses(os.path.join(out_dir, "log.csv"), os.path.join(out_dir, "loss.png"))


def plot_losses(log_path, png_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed, so no loss.png: pip install matplotlib", file=sys.stderr)
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "mse", "vb"):
        points = [(int(row["step"]), float(row[key])) for row in rows if row[key]]  # "": every step skipped, or no vb
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set(xlabel="training step", ylabel="loss (log scale)", yscale="log",
           title="training loss: mean over each log interval")
    ax.legend()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


# ----------------------------------------------------------------------------------------------------------
# Training


def drop_labels(y, p, null_label):
    """Each label becomes the null label with probability p, so that the network also learns eps(x_t, no class):
    classifier-free guidance mixes the two at sampling time (Ho & Salimans 2022, Algorithm 1)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_label), y)


def training_step(train_model, model, ema, diffusion, optimizer, scaler, x0, step, args, amp_dtype, y=None):
    """One AdamW step on the batch x0 (B, 3, H, W) (and its class labels y (B,), if class-conditional; the
    condition of a super-resolution model is made from x0 here), then the EMA update. train_model is model, or its
    DDP or torch.compile wrapper. With --microbatch M the batch runs in chunks of M images whose gradients add up
    to the whole batch's. Returns the weighted mean loss, the per-example losses, the gradient norm and whether the
    loss and gradients were finite (under fp16, the scaler skipped the step if not), all left on the device: reading
    them would make the CPU wait for the GPU."""
    B = x0.shape[0]
    # Everything random about the batch is drawn for all of it before it is split: chunks change memory, not results
    t, weights = diffusion.sample_timesteps(B, x0.device)  # weights: importance sampling's 1 / (T p_t)
    noise = torch.randn_like(x0)
    model_kwargs = {}
    if y is not None:
        model_kwargs["y"] = drop_labels(y, args.class_dropout, model.num_classes)
    if args.super_res_from:  # the condition: x0 shrunk to S x S and enlarged back, (B, 3, H, W)
        model_kwargs["low_res"] = util.upsample(util.downsample(x0, args.super_res_from), x0.shape[-1])
    for group in optimizer.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))  # linear warm-up
    optimizer.zero_grad(set_to_none=True)
    chunk = args.microbatch or B
    chunk_losses = []
    for start in range(0, B, chunk):
        part = slice(start, start + chunk)
        is_last = start + chunk >= B
        # DDP all-reduces the gradients in every backward; once, after the last chunk's, is enough
        with train_model.no_sync() if hasattr(train_model, "no_sync") and not is_last else contextlib.nullcontext():
            with util.autocast(x0.device, amp_dtype):
                losses = diffusion.training_losses(train_model, x0[part], t[part], noise[part],
                                                   {key: value[part] for key, value in model_kwargs.items()})
            loss = (losses["loss"] * weights[part]).sum() / B  # the chunk's share of the batch's mean
            # A non-finite loss must make the gradients non-finite, so that the scaler skips the step (and under DDP
            # every rank sees it after the all-reduce): a constant NaN factor does that; an inf added would not
            loss = loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))
            scaler.scale(loss).backward()  # the scaler multiplies fp16 losses so small gradients do not flush to 0
        chunk_losses.append(losses)
    losses = {key: torch.cat([part[key] for part in chunk_losses]) for key in chunk_losses[0]}  # (B,) each
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    finite_step = torch.isfinite(grad_norm)  # what the scaler decides on: it skips a step with non-finite gradients
    scaler.step(optimizer)
    scaler.update()  # after a skipped step, halves the scale
    if diffusion.importance_sampling:
        diffusion.update_loss_history(t, losses["loss"])  # every chunk's; non-finite losses are left out
    update_ema(ema, model, step, args.ema_rate, finite_step if scaler.is_enabled() else None)
    return (losses["loss"] * weights).mean(), losses, grad_norm, finite_step


def update_ema(ema, model, step, rate, finite_step=None):
    """ema = decay * ema + (1 - decay) * model, all tensors in one call each, not one launch per tensor. The decay
    is warmed up as min(rate, (1 + step) / (10 + step)), so that short runs still get a useful EMA. finite_step
    (fp16): a step the scaler skipped leaves the EMA as it is, decided on the device, not by an `if`."""
    decay = min(rate, (1 + step) / (10 + step))
    ema_params, params = list(ema.parameters()), list(model.parameters())
    with torch.no_grad():
        if finite_step is None:
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        else:
            deltas = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(deltas, (1 - decay) * finite_step)  # 0 after a skipped step
            torch._foreach_add_(ema_params, deltas)


def build_optimizer(model, args):
    # fused: one kernel for all parameters, and with fp16's GradScaler the skipped-step check happens on the device
    # instead of a .item() every step (torch >= 2.4 has it on the CPU and CUDA)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)


class LogInterval:
    """What a row of log.csv reports, summed on the device over the steps since the last row (reading the sums
    every step would make the CPU wait for the GPU), and the watch for divergence: `limit` steps in a row whose loss
    or gradients were not finite (fp16: skipped ones; fp32 and bf16: the first such step) stop the run."""

    def __init__(self, device, step, limit):
        # loss, mse, vb, grad norm and their count over the finite steps, and the count of the others
        self.sums = torch.zeros(6, device=device)
        self.not_finite = torch.tensor([0.0, 0, 0, 0, 0, 1], device=device)  # what a skipped step adds
        self.in_a_row = torch.zeros((), device=device)
        self.failed_at = torch.tensor(-1, device=device)  # the step at which in_a_row reached the limit
        self.limit, self.first_step, self.start_time, self.has_vb = limit, step, time.time(), False

    def add(self, step, loss, losses, grad_norm, finite_step):
        self.has_vb = "vb" in losses
        vb = losses["vb"].mean() if self.has_vb else torch.zeros_like(loss)
        values = torch.stack([loss, losses["mse"].mean(), vb, grad_norm.float(), torch.ones_like(loss),
                              torch.zeros_like(loss)]).detach()
        self.sums += torch.where(finite_step, values, self.not_finite)  # a skipped step's NaN stays out of the row
        self.in_a_row = (self.in_a_row + 1) * ~finite_step
        self.failed_at = torch.where((self.failed_at < 0) & (self.in_a_row >= self.limit), step, self.failed_at)

    def stop_if_diverged(self, scaler, ckpt_path):
        """Exits with one line, before anything is saved, if the limit was reached."""
        failed_at = int(self.failed_at.item())
        if failed_at < 0:
            return
        if scaler.is_enabled():
            raise SystemExit(
                f"error: {self.limit} steps in a row up to step {failed_at} had a loss or gradients that were not "
                f"finite and were skipped, with the fp16 loss scale down to {scaler.get_scale():g}; stopped without "
                f"saving, the last good checkpoint is {ckpt_path}. Try a lower --lr, --precision bf16 (on GPUs from "
                f"Ampere on) or fp32, or a larger --max_skipped_steps")
        raise SystemExit(f"error: the loss or gradients became non-finite at step {failed_at}; stopped without "
                         f"saving, the last good checkpoint is {ckpt_path}. Try a lower --lr, or --precision fp32")

    def row(self, step, lr, images_per_step, run_start_time, scaler):
        """The log.csv row of the steps since the last one, as text by column (averages over the finite steps),
        then a new interval. Costs one wait for the device."""
        now = time.time()
        loss, mse, vb, grad_norm, count, skipped = self.sums.tolist()
        self.sums.zero_()
        images_per_s = (step - self.first_step) * images_per_step / (now - self.start_time)
        self.first_step = step
        averages = ["", "", "", ""]  # every step of the interval skipped: nothing to average
        if count:
            averages = [f"{loss / count:.6f}", f"{mse / count:.6f}", f"{vb / count:.5f}" if self.has_vb else "",
                        f"{grad_norm / count:.4f}"]
        scale = f"{scaler.get_scale():g}" if scaler.is_enabled() else ""
        values = [str(step), *averages[:3], f"{lr:.3g}", averages[3], f"{images_per_s:.1f}",
                  f"{now - run_start_time:.1f}", str(int(skipped)), scale]
        return dict(zip(LOG_COLUMNS, values))

    def restart_clock(self):
        self.start_time = time.time()  # images/s counts training only, not the plotting, sampling and saving


# ----------------------------------------------------------------------------------------------------------
# The run: processes and devices; model, optimiser and resume; the loop


def check_flags(args):
    """One line for a flag that cannot work, before anything is built."""
    if not 0 <= args.dropout < 1:
        raise SystemExit(f"error: --dropout {args.dropout} must be at least 0 and below 1: it is the probability of "
                         "zeroing each activation in a residual block (0.1 by default)")
    if args.super_res_from is not None and not 1 <= args.super_res_from < args.image_size:
        raise SystemExit(f"error: --super_res_from {args.super_res_from} must be between 1 and --image_size - 1 = "
                         f"{args.image_size - 1}: the model makes {args.image_size}px images from smaller ones")
    if args.super_res_from and args.class_cond:
        raise SystemExit("error: --super_res_from and --class_cond together are not supported; train one of the two")
    if args.microbatch is not None and not (args.microbatch >= 1 and args.batch_size % args.microbatch == 0):
        raise SystemExit(f"error: --microbatch {args.microbatch} must divide --batch_size {args.batch_size}: each "
                         f"step runs the batch in chunks of that many images")
    if args.max_skipped_steps < 1:
        raise SystemExit(f"error: --max_skipped_steps {args.max_skipped_steps} must be at least 1")


def start_processes(args):
    """(device, rank, world size). Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) this process is one
    of several, each on its own GPU, joined in a process group: NCCL between GPUs, gloo between CPU processes."""
    device = util.pick_device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    util.seed_everything(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs on Ampere+: same results, faster
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device, rank, world_size


def checkpoint_to_resume(out_dir, device):
    """The checkpoint dict to resume from: OUT/ckpt.pt, or OUT/ckpt.prev.pt (the one saved before it, which
    util.save_checkpoint keeps) when ckpt.pt is missing or damaged, said in one line; None for a new run. Exits with
    one line, touching neither file, when neither can be resumed from."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    previous = util.previous_checkpoint(ckpt_path)
    if not os.path.exists(ckpt_path) and not os.path.exists(previous):
        return None

    def load(path):
        """(the checkpoint at path, None), or (None, the one-line reason it cannot be resumed from)."""
        try:
            checkpoint = util.load_checkpoint(path, map_location=device)
        except (FileNotFoundError, ValueError) as error:
            return None, str(error)
        if not isinstance(checkpoint, dict) or not {"model", "ema", "optimizer", "scaler", "diffusion", "step",
                                                   "config", "rng"} <= checkpoint.keys():
            return None, f"{path} is not a checkpoint made by this project's train.py"
        return checkpoint, None

    checkpoint, error = load(ckpt_path)
    if not error:
        return checkpoint
    if not os.path.exists(previous):
        raise SystemExit(f"error: {error}; move it away to start a new run in {out_dir}")
    # ckpt.pt is damaged, or a kill came between save_checkpoint's two renames: resume from the one before it
    problem = "is damaged or unreadable" if os.path.exists(ckpt_path) else "is missing"
    checkpoint, previous_error = load(previous)
    if previous_error:
        raise SystemExit(f"error: {ckpt_path} {problem}, and {previous}, the checkpoint saved before it, cannot be "
                         f"resumed from either ({previous_error}); neither was changed: copy a good checkpoint "
                         f"to {ckpt_path} to resume, or move both away to start a new run in {out_dir}")
    kept = ""
    if os.path.exists(ckpt_path) and (not dist.is_initialized() or dist.get_rank() == 0):
        # moved aside, so that the next save does not make the damaged file ckpt.prev.pt in place of the good one
        kept = f" (the damaged file is kept as {ckpt_path}.damaged)"
        os.replace(ckpt_path, ckpt_path + ".damaged")
    print(f"{ckpt_path} {problem}: resuming from {previous}, the checkpoint saved before it, at step "
          f"{checkpoint['step']}{kept}", file=sys.stderr)
    return checkpoint


def build_or_resume(args, config, device, amp_dtype):
    """(model, EMA, process, optimiser, scaler, checkpoint): new ones, or those of checkpoint_to_resume (checkpoint
    is then its dict, else None)."""
    model, diffusion = util.build_model_and_diffusion(config)
    model.to(device)
    diffusion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # NHWC convs use tensor cores without layout transposes
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # the weights we sample from (EMA, sec. 4 of DDPM)
    checkpoint = checkpoint_to_resume(args.out_dir, device)
    if checkpoint is None:
        return model, ema, diffusion, optimizer, scaler, None
    # older checkpoints: no classes, no super-resolution, DDPM's GroupNorm rule
    trained = {"class_cond": False, "classes": None, "super_res_from": None, "min_group_channels": 1,
               **checkpoint["config"]}
    changed = [f"--{k} {trained.get(k)} (now {config[k]})" for k in ARCHITECTURE
               if trained.get(k) != config[k] and str(trained.get(k)) != str(config[k])]
    if changed:
        raise SystemExit(f"the checkpoint in {args.out_dir} was trained with {', '.join(changed)}: pass the same "
                         f"flags to resume, or a new --out_dir to start another run")
    for name, module in (("model", model), ("ema", ema), ("optimizer", optimizer), ("scaler", scaler),
                         ("diffusion", diffusion)):
        module.load_state_dict(checkpoint[name])
    return model, ema, diffusion, optimizer, scaler, checkpoint


def save_checkpoint(path, model, ema, optimizer, scaler, diffusion, step, config, device):
    """Write path atomically, keeping the checkpoint it replaces as OUT/ckpt.prev.pt (util.save_checkpoint), and
    never from weights that are not finite."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        return print(f"weights are not finite at step {step}: kept the last good {path}", file=sys.stderr)
    util.save_checkpoint(dict(
        model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(), diffusion=diffusion.state_dict(), step=step, config=config,
        rng=dict(torch=torch.get_rng_state(),
                 cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
    ), path)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a rented machine going away, train.sh restarting) and Ctrl-C set a flag: the loop finishes its step,
    saves and exits. Yields the list of signal names received. A second Ctrl-C stops at once."""
    received = []

    def request_stop(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        received.append(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ranks_agree_to_stop(stop, device):
    """Under torchrun every rank must stop at the same step (a rank stopping alone would hang the others): true if
    any rank wants to. Each call waits for the GPU, so the loop asks only every STOP_CHECK_EVERY steps: often enough
    that torchrun's 30 s between forwarding SIGTERM and SIGKILL leave time to save."""
    stop = torch.tensor(float(stop), device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


def train(args, config, model, train_model, ema, diffusion, optimizer, scaler, batches, dataset, step, device,
          world_size, amp_dtype):
    """The loop, from step to --max_steps (or a stop signal, or --max_minutes). Returns the last step."""
    is_main, distributed = not dist.is_initialized() or dist.get_rank() == 0, world_size > 1
    ckpt_path, tensorboard = os.path.join(args.out_dir, "ckpt.pt"), None

    def save():
        if is_main:
            save_checkpoint(ckpt_path, model, ema, optimizer, scaler, diffusion, step, config, device)

    if is_main:
        open_log(args.out_dir, step)
        tensorboard = open_tensorboard(args.out_dir, step) if args.tensorboard else None
    interval = LogInterval(device, step, args.max_skipped_steps if scaler.is_enabled() else 1)
    start_time, stop_reason = time.time(), "max_steps"
    progress = tqdm(total=args.max_steps, initial=step, disable=not is_main, desc="training", dynamic_ncols=True,
                    mininterval=1 if sys.stderr.isatty() else 30)
    with stop_signals() as received, progress:
        while step < args.max_steps:
            x0, y = next(batches)  # (B, 3, H, W) in [-1, 1] on the device, (B,) labels or None
            loss, losses, grad_norm, finite_step = training_step(train_model, model, ema, diffusion, optimizer,
                                                                 scaler, x0, step, args, amp_dtype, y)
            step += 1
            progress.update()
            interval.add(step, loss, losses, grad_norm, finite_step)

            # -- logging, samples, checkpoints: the only places that wait for the device --------------------
            at_log_step = step % args.log_every == 0 or step == args.max_steps
            at_save_step = step % args.save_every == 0 and step < args.max_steps
            stop = bool(received) or (args.max_minutes > 0 and time.time() - start_time > 60 * args.max_minutes)
            if distributed:
                stop = (at_log_step or step % STOP_CHECK_EVERY == 0) and ranks_agree_to_stop(stop, device)
            if at_log_step or at_save_step or stop:
                interval.stop_if_diverged(scaler, ckpt_path)  # before anything is saved
            if is_main and (at_log_step or stop):
                row = interval.row(step, optimizer.param_groups[0]["lr"], args.batch_size * world_size, start_time,
                                   scaler)
                write_log(row, args.out_dir, tensorboard)
                progress.set_postfix(loss=row["loss"] or "-", img_s=row["images_per_s"])
            if is_main and args.sample_every and step % args.sample_every == 0:
                save_samples(ema, diffusion, config, step, device, dataset, tensorboard)
            if at_save_step:
                save()
            if at_log_step:
                interval.restart_clock()
            if stop:
                stop_reason = f"{received[0]} received" if received else "--max_minutes reached"
                break
        save()
        if is_main and (not args.sample_every or step % args.sample_every) and stop_reason == "max_steps":
            save_samples(ema, diffusion, config, step, device, dataset, tensorboard)
    if tensorboard is not None:
        tensorboard.close()
    if is_main:
        print(f"stopped at step {step} ({stop_reason}); checkpoint: {ckpt_path}", file=sys.stderr)
    return step


def main(argv=None):
    args = parse_args(argv)
    check_flags(args)
    config = vars(args)
    device, rank, world_size = start_processes(args)
    amp_dtype = util.autocast_dtype(device, args.precision)
    try:
        try:  # check the data first: a bad folder stops the run at once, with one line saying what to do
            dataset = util.NumberedImages(args.data_dir, args.image_size, labels=args.class_cond)
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        config["classes"] = dataset.classes  # None, or the class names: the checkpoint says what each label means

        model, ema, diffusion, optimizer, scaler, checkpoint = build_or_resume(args, config, device, amp_dtype)
        step = checkpoint["step"] if checkpoint else 0
        train_model = model
        if world_size > 1:  # every rank must resume from the same checkpoint: a machine without it would start afresh
            steps = torch.tensor([step, -step], device=device)
            dist.all_reduce(steps, op=dist.ReduceOp.MAX)
            if steps[0] != -steps[1]:
                raise SystemExit(f"the ranks found different checkpoints in {args.out_dir} (steps {-steps[1]} to "
                                 f"{steps[0]}): on several machines --out_dir must be a folder they all share")
            train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if args.compile:
            train_model = torch.compile(train_model)

        batches = device_batches(dataset, args, device, step, rank, world_size)
        if checkpoint is not None:  # after the loader drew its worker seed: the random stream is the interrupted run's
            torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
            if checkpoint["rng"]["cuda"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), device)
            if world_size > 1:  # one rank's state was saved; the others get their own stream from the step
                torch.manual_seed(args.seed + rank + 1000 * step)

        if rank == 0:
            os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
            num_params = sum(p.numel() for p in model.parameters())
            print(f"{num_params / 1e6:.2f}M parameters, {len(dataset) // 2} images, {world_size} x {device}, "
                  f"autocast {amp_dtype}, {'resuming at step ' + str(step) if step else 'starting'}", file=sys.stderr)
        return train(args, config, model, train_model, ema, diffusion, optimizer, scaler, batches, dataset, step,
                     device, world_size, amp_dtype)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

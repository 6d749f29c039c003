"""
Train an Improved DDPM (Nichol & Dhariwal 2021) on a folder of numbered PNGs 1.png ... N.png.

    python train.py    # the CPU demo, the bundled emoji at 32x32: 2 cores, ~12 min with AVX-512 BF16/AMX, ~26 AVX2
    sh train.sh        # the 64x64 anime-faces recipe, in the background, on every GPU (torchrun)

--out_dir gets ckpt.pt (weights, EMA, optimiser, config), the one before it (ckpt.prev.pt), log.csv, loss.png and
samples/STEP.png. A run resumes from OUT/ckpt.pt (ckpt.prev.pt if it is damaged); SIGTERM, SIGHUP or Ctrl-C save
and exit. Then `python eval.py OUT/ckpt.pt`.
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
from matplotlib.figure import Figure
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
    g.add_argument("--data_dir", default="data/emoji", help="folder of 1.png ... N.png (see `util.py prepare`)")
    g.add_argument("--image_size", type=int, default=32, help="other sizes are centre-cropped and resized")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader processes per GPU (0: the main process)")
    g.add_argument("--class_cond", action=on_off, default=False,
                   help="class-conditional, classes from DATA_DIR/labels.txt (util.py prepare --labels)")
    g.add_argument("--class_dropout", type=float, default=0.1,
                   help="with --class_cond, the chance a label becomes the null label (classifier-free guidance)")
    g.add_argument("--super_res_from", type=int, default=None, metavar="S",
                   help="super-resolution: make IMAGE_SIZE images from S x S ones (sample with sample.py --low_res)")
    g = p.add_argument_group("model (unet.py)")
    g.add_argument("--base_channels", type=int, default=32, help="channels at full resolution: the size knob")
    g.add_argument("--channel_mult", type=int_list, default=(1, 2, 2, 2), help="channel multiplier per level")
    g.add_argument("--num_res_blocks", type=int, default=1, help="residual blocks per level")
    g.add_argument("--attention_resolutions", type=int_list, default=(8,), help="feature-map sizes with attention")
    g.add_argument("--num_heads", type=int, default=4, help="attention heads")
    g.add_argument("--min_group_channels", type=int, default=4,
                   help="GroupNorm: 32 groups, halved until each has this many channels (1: DDPM's rule)")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout in residual blocks")
    g = p.add_argument_group("diffusion (diffusion.py)")
    g.add_argument("--num_timesteps", type=int, default=1000, help="T, the number of noising steps")
    g.add_argument("--noise_schedule", choices=("cosine", "linear"), default="cosine", help="eq. 17, or DDPM's")
    g.add_argument("--learn_sigma", action=on_off, default=True, help="learn the reverse variances (eq. 15)")
    g.add_argument("--loss_type", choices=("hybrid", "mse", "kl"), default="hybrid",
                   help="hybrid = L_simple + 0.001 L_vlb (eq. 16); kl = L_vlb; mse = L_simple (+ L_t for sigma)")
    g.add_argument("--importance_sampling", action=on_off, default=False,
                   help="sample t with p_t ∝ sqrt(E[L_t^2]) (eq. 18), for --loss_type kl")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32, help="images per GPU (or CPU process) per step")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--warmup_steps", type=int, default=200, help="linear learning-rate warm-up from 0")
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument("--ema_rate", type=float, default=0.9999, help="EMA decay, warmed up as (1+step)/(10+step)")
    g.add_argument("--max_steps", type=int, default=2000, help="optimiser steps in all, across resumes")
    g.add_argument("--max_minutes", type=float, default=0, help="also save and stop after this long (0: no limit)")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and noise")
    g = p.add_argument_group("memory: the same steps in less GPU memory, for more compute")
    g.add_argument("--microbatch", type=int, default=None, metavar="M",
                   help="run each batch in chunks of M images, accumulating gradients (M divides --batch_size)")
    g.add_argument("--checkpointing", action=on_off, default=False,
                   help="activation checkpointing: rerun each block in the backward instead of keeping its inside")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="runs/emoji", help="checkpoints, logs and samples; resumed from if there")
    g.add_argument("--save_every", type=int, default=500, help="write OUT/ckpt.pt every N steps")
    g.add_argument("--sample_every", type=int, default=500, help="a grid of EMA samples every N steps (0: at the end)")
    g.add_argument("--num_samples", type=int, default=36, help="images in each sample grid")
    g.add_argument("--log_every", type=int, default=50, help="a row of OUT/log.csv (and loss.png) every N steps")
    g.add_argument("--tensorboard", action=on_off, default=False, help="also log to OUT/tensorboard/")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 where native, else fp16 + gradient scaler on a GPU, else fp32")
    g.add_argument("--max_skipped_steps", type=int, default=20,
                   help="fp16: stop (without saving) after this many non-finite steps in a row; fp32/bf16: at one")
    g.add_argument("--compile", action=on_off, default=False, help="torch.compile the model (GPU)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


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


# The checkpoint must match the model and process these flags build; the others may change between resumes.
ARCHITECTURE = ("image_size", "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                "num_timesteps", "noise_schedule", "learn_sigma", "loss_type", "importance_sampling", "class_cond",
                "classes", "super_res_from", "min_group_channels")
STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on stopping, under torchrun
LOG_COLUMNS = ("step", "loss", "mse", "vb", "lr", "grad_norm", "images_per_s", "elapsed_s", "skipped", "loss_scale")


# ----------------------------------------------------------------------------------------------------------
# Data: util.NumberedImages (with mirrored copies: the random flip); here, only their order


class ShuffleForever(torch.utils.data.Sampler):
    """Dataset indices reshuffled every epoch, forever, in an order set by the seed alone, so that a run resumed at
    step s skips the s * batch_size indices used. Under DDP rank r takes every world_size-th index."""

    def __init__(self, size, seed, start=0, rank=0, world_size=1):
        self.size, self.seed, self.start, self.rank, self.world_size = size, seed, start, rank, world_size

    def __iter__(self):
        per_rank = self.size // self.world_size  # the same count on every rank, so no rank waits for another
        epoch, offset = divmod(self.start, per_rank)
        while True:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from order[self.rank::self.world_size][:per_rank][offset:].tolist()
            epoch, offset = epoch + 1, 0


def leave_process_group(worker_id):
    # torchrun and Ctrl-C signal the rank's whole process group: in a group of its own, a loader worker outlives them
    # until its rank has saved (and still ends when the rank does, which signals it by its pid, or dies)
    os.setpgid(0, 0)


def device_batches(dataset, args, device, step, rank, world_size):
    """(x0 (B, 3, H, W) in [-1, 1], y (B,) labels or None) on the device, forever, from where step left off."""
    sampler = ShuffleForever(len(dataset), args.seed, start=step * args.batch_size, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                                         pin_memory=device.type == "cuda", worker_init_fn=leave_process_group)
    batches = iter(loader)  # now: it draws the workers' seed from the random stream, before a resume restores it

    def on_device():
        for batch in batches:
            x0, y = batch if args.class_cond else (batch, None)
            x0 = x0.to(device, non_blocking=True)
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            yield x0, y if y is None else y.to(device, non_blocking=True)

    return on_device()


# ----------------------------------------------------------------------------------------------------------
# Training


def drop_labels(y, p, null_label):
    """Each label becomes the null label with probability p, so that the network also learns eps(x_t, no class):
    classifier-free guidance mixes the two at sampling time (Ho & Salimans 2022, Algorithm 1)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_label), y)


def training_step(train_model, model, ema, diffusion, optimizer, scaler, x0, step, args, amp_dtype, y=None):
    """One AdamW step on x0 (B, 3, H, W) (and labels y (B,)), then the EMA update. train_model is model or its
    DDP/compiled wrapper. --microbatch M runs the batch in chunks whose gradients add up to the batch's. Returns
    the weighted mean loss, the per-example losses, the gradient norm and whether they were finite (fp16: if not,
    the scaler skipped the step), all left on the device: reading them would make the CPU wait for the GPU."""
    B = x0.shape[0]
    # Everything random is drawn for the whole batch before it is split: chunks change memory, not results
    t, weights = diffusion.sample_timesteps(B, x0.device)  # weights: importance sampling's 1 / (T p_t)
    noise = torch.randn_like(x0)
    model_kwargs = {}
    if y is not None:
        model_kwargs["y"] = drop_labels(y, args.class_dropout, model.num_classes)
    if args.super_res_from:  # the condition: x0 shrunk to S x S (B, 3, S, S), as sample.py --low_res reads it
        model_kwargs["low_res"] = util.downsample(x0, args.super_res_from)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))  # linear warm-up
    optimizer.zero_grad(set_to_none=True)
    chunk, chunk_losses = args.microbatch or B, []
    for start in range(0, B, chunk):
        part = slice(start, start + chunk)
        # DDP all-reduces the gradients in every backward; once, after the last chunk's, is enough
        last = start + chunk >= B
        with contextlib.nullcontext() if last or not hasattr(train_model, "no_sync") else train_model.no_sync():
            with util.autocast(x0.device, amp_dtype):
                losses = diffusion.training_losses(train_model, x0[part], t[part], noise[part],
                                                   {key: value[part] for key, value in model_kwargs.items()})
            loss = (losses["loss"] * weights[part]).sum() / B  # the chunk's share of the batch's mean
            # A non-finite loss must make the gradients non-finite, so that the scaler skips the step (and under DDP
            # every rank sees it after the all-reduce): a NaN factor does that; an inf added would not
            loss = loss * torch.where(torch.isfinite(loss), 1.0, float("nan"))
            scaler.scale(loss).backward()  # fp16: the scaled loss keeps small gradients from flushing to 0
        chunk_losses.append(losses)
    losses = {key: torch.cat([part[key] for part in chunk_losses]) for key in chunk_losses[0]}  # (B,) each
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    finite_step = torch.isfinite(grad_norm)  # what the scaler decides on
    scaler.step(optimizer)
    scaler.update()  # after a skipped step, halves the scale
    if diffusion.importance_sampling:
        diffusion.update_loss_history(t, losses["loss"])  # non-finite losses are left out
    update_ema(ema, model, step, args.ema_rate, finite_step if scaler.is_enabled() else None)
    return (losses["loss"] * weights).mean(), losses, grad_norm, finite_step


def update_ema(ema, model, step, rate, finite_step=None):
    """ema += (1 - decay) (model - ema), in one call for all tensors, decay warmed up as min(rate, (1+step)/(10+step))
    so that short runs get a useful EMA. finite_step (fp16): a skipped step leaves the EMA as it is (on the device)."""
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
    # fused: one kernel for all parameters; with fp16's scaler the skip check stays on the device (no .item())
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------------
# Outputs: log.csv (+ loss.png, TensorBoard), sample grids


class Log:
    """log.csv's rows: averages over the finite steps since the last row, summed on the device (a read every step
    would make the CPU wait for the GPU). Also the watch for divergence: `limit` non-finite steps in a row (fp16:
    skipped ones; fp32 and bf16: one) stop the run without saving. On resume, rows after the checkpoint go."""

    def __init__(self, args, step, device, limit, write):
        self.path, self.limit, self.write, self.first_step, self.clock = args.out_dir, limit, write, step, time.time()
        self.sums = torch.zeros(6, device=device)  # loss, mse, vb, grad norm, finite steps, skipped steps
        self.skipped = torch.tensor([0.0, 0, 0, 0, 0, 1], device=device)  # made once: a copy to a GPU waits for it
        self.in_a_row, self.failed_at = torch.zeros((), device=device), torch.tensor(-1, device=device)
        self.tensorboard = None
        if not write:
            return
        log_csv = os.path.join(args.out_dir, "log.csv")
        kept = []
        if step and os.path.exists(log_csv):
            with open(log_csv) as f:
                kept = [line for line in f.readlines()[1:] if int(line.split(",")[0]) <= step]
        with open(log_csv, "w") as f:
            f.write(",".join(LOG_COLUMNS) + "\n" + "".join(kept))
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(os.path.join(args.out_dir, "tensorboard"), purge_step=step or None)
            except ImportError:
                print("tensorboard is not installed, so no OUT/tensorboard/: pip install tensorboard", file=sys.stderr)

    def add(self, step, loss, losses, grad_norm, finite_step):
        vb = losses["vb"].mean() if "vb" in losses else torch.full_like(loss, float("nan"))  # NaN: no vb column
        values = torch.stack([loss, losses["mse"].mean(), vb, grad_norm.float(), torch.ones_like(loss),
                              torch.zeros_like(loss)])
        self.sums += torch.where(finite_step, values.detach(), self.skipped)  # a skipped step's NaN stays out
        self.in_a_row = (self.in_a_row + 1) * ~finite_step
        self.failed_at = torch.where((self.failed_at < 0) & (self.in_a_row >= self.limit), step, self.failed_at)

    def stop_if_diverged(self, scaler, ckpt_path):
        failed_at, keep = int(self.failed_at), f"stopped without saving, the last good checkpoint is {ckpt_path}"
        if failed_at >= 0 and scaler.is_enabled():
            raise SystemExit(f"error: {self.limit} steps in a row up to step {failed_at} had a loss or gradients that "
                             f"were not finite and were skipped, with the fp16 loss scale down to "
                             f"{scaler.get_scale():g}; {keep}. Try a lower --lr, --precision bf16 or fp32, or a "
                             f"larger --max_skipped_steps")
        if failed_at >= 0:
            raise SystemExit(f"error: the loss or gradients became non-finite at step {failed_at}; {keep}. Try a "
                             f"lower --lr, or --precision fp32")

    def row(self, step, lr, images_per_step, start_time, scaler):
        """Appends the row of the steps since the last one (one wait for the device) and returns it."""
        loss, mse, vb, grad_norm, count, skipped = self.sums.tolist()
        self.sums.zero_()
        averages = [f"{value / count:{digits}}" if count and math.isfinite(value) else ""  # "": all skipped, or no vb
                    for value, digits in ((loss, ".6f"), (mse, ".6f"), (vb, ".5f"), (grad_norm, ".4f"))]
        images_per_s = (step - self.first_step) * images_per_step / (time.time() - self.clock)
        scale = f"{scaler.get_scale():g}" if scaler.is_enabled() else ""
        row = dict(zip(LOG_COLUMNS, [str(step), *averages[:3], f"{lr:.3g}", averages[3], f"{images_per_s:.1f}",
                                     f"{time.time() - start_time:.1f}", str(int(skipped)), scale]))
        self.first_step = step
        if self.write:
            with open(os.path.join(self.path, "log.csv"), "a") as f:
                f.write(",".join(row.values()) + "\n")
            plot_losses(self.path)
            for column, value in list(row.items())[1:]:
                if self.tensorboard and value:
                    self.tensorboard.add_scalar(f"train/{column}", float(value), step)
            if self.tensorboard:
                self.tensorboard.flush()
        return row


def plot_losses(out_dir):
    """OUT/loss.png from OUT/log.csv."""
    with open(os.path.join(out_dir, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    ax = Figure(figsize=(7, 4)).subplots()
    for key in ("loss", "mse", "vb"):
        points = [(int(row["step"]), float(row[key])) for row in rows if row[key]]  # "": all skipped, or no vb
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set(xlabel="training step", ylabel="loss (log scale)", yscale="log", title="mean over each log interval")
    ax.legend()
    ax.figure.savefig(os.path.join(out_dir, "loss.tmp.png"), dpi=100)
    os.replace(os.path.join(out_dir, "loss.tmp.png"), os.path.join(out_dir, "loss.png"))


def save_samples(ema, diffusion, config, step, device, dataset, amp_dtype, tensorboard=None):
    """OUT/samples/STEP.png: EMA samples with 50 respaced steps (sec. 4), the same noise every time, so the grids
    show the model improving. Class-conditional: a row per class (the first 8). Super-resolution: rows of three
    for the first training images: low-res input, sample, original."""
    num, nrow, model_kwargs, row_labels, size = config["num_samples"], None, {}, [], config["image_size"]
    if config["classes"]:
        rows = min(8, len(config["classes"]))
        nrow = max(1, num // rows)
        num, row_labels = rows * nrow, config["classes"][:rows]
        model_kwargs["y"] = torch.arange(rows, device=device).repeat_interleave(nrow)  # row r: class r
    if config["super_res_from"]:
        images = min(num, len(dataset.paths))  # indices below len(paths): not mirrored
        nrow = max(1, math.isqrt(images))
        num = nrow * (images // nrow)  # whole rows
        originals = torch.stack([dataset[i] for i in range(num)]).to(device)  # (num, 3, H, W)
        model_kwargs["low_res"] = util.downsample(originals, config["super_res_from"])  # (num, 3, S, S)
    # on a forked and restored random stream: sampling must not change the training run's
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), util.autocast(device, amp_dtype):
        torch.manual_seed(config["seed"])
        samples = diffusion.sample(ema, (num, 3, size, size), steps=min(50, diffusion.num_timesteps), device=device,
                                   model_kwargs=model_kwargs).float()  # (num, 3, H, W) in [-1, 1]
    if config["super_res_from"]:
        blocky = F.interpolate(model_kwargs["low_res"], size=(size, size), mode="nearest")  # as it is: big pixels
        triples = torch.stack([blocky, samples, originals]).unflatten(1, (-1, nrow))  # (3, rows, nrow, 3, H, W)
        samples = triples.transpose(0, 1).flatten(0, 2)  # rows in threes: low-res, sample, original
        row_labels = [f"{config['super_res_from']}x{config['super_res_from']}", "sample", "original"] * (num // nrow)
    path = os.path.join(config["out_dir"], "samples", f"{step:06d}.png")
    grid = util.save_image_grid(samples, path, nrow=nrow, row_labels=row_labels)
    if tensorboard is not None:  # the grid as saved, labels and all: (3, H, W) uint8
        tensorboard.add_image("samples", pil_to_tensor(grid), step)
        tensorboard.flush()


# ----------------------------------------------------------------------------------------------------------
# The run: processes and devices; model, optimiser and resume; the loop


def start_processes(args):
    """(device, rank, world size). Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set) one of several processes, each
    on its own GPU (util.pick_device), in a process group: NCCL between GPUs, gloo between CPU processes."""
    device = util.pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:1 in one process too: its random stream is the one sampling uses
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # Ampere on: same, faster
        torch.backends.cudnn.benchmark = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(args.seed + rank)  # the CPU's and every GPU's stream
    return device, rank, world_size


def checkpoint_to_resume(out_dir, rank):
    """OUT/ckpt.pt's dict (on the CPU), or ckpt.prev.pt's, said in one line, when ckpt.pt is missing or damaged;
    None for a new run. Exits with one line, changing neither file, when neither can be resumed from."""
    path = os.path.join(out_dir, "ckpt.pt")
    previous = util.previous_checkpoint(path)
    if not os.path.exists(path) and not os.path.exists(previous):
        return None
    try:
        return util.load_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        if not os.path.exists(previous):
            raise SystemExit(f"error: {error}; move it away to start a new run in {out_dir}") from None
    problem = "is damaged or unreadable" if os.path.exists(path) else "is missing"  # or a kill between two renames
    try:
        checkpoint = util.load_checkpoint(previous)
    except ValueError as error:
        raise SystemExit(f"error: {path} {problem}, and {previous}, the checkpoint saved before it, cannot be resumed "
                         f"from either ({error}); neither was changed: copy a good checkpoint to {path} to resume, or "
                         f"move both away to start a new run in {out_dir}") from None
    kept = ""
    if os.path.exists(path) and rank == 0:  # moved aside, or the next save would make it ckpt.prev.pt
        kept = f" (the damaged file is kept as {path}.damaged)"
        os.replace(path, path + ".damaged")
    print(f"{path} {problem}: resuming from {previous}, the checkpoint saved before it, at step "
          f"{checkpoint['step']}{kept}", file=sys.stderr)
    return checkpoint


def build_or_resume(args, config, device, amp_dtype, rank=0):
    """(model, EMA, process, optimiser, scaler, resumed): new ones, or those of the checkpoint in OUT, resumed is
    then {"step", "rng"}, else None. The checkpoint is read to the CPU and dropped once applied."""
    model, diffusion = util.build_model_and_diffusion(config)
    model.to(device)
    diffusion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # NHWC convs use tensor cores without layout transposes
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # the weights we sample from (EMA, sec. 4 of DDPM)
    checkpoint = checkpoint_to_resume(args.out_dir, rank)
    if checkpoint is None:
        return model, ema, diffusion, optimizer, scaler, None
    trained = {"class_cond": False, "classes": None, "super_res_from": None, "min_group_channels": 1,
               **checkpoint["config"]}  # older checkpoints: no classes, no super-resolution, DDPM's GroupNorm rule
    changed = [f"--{k} {trained.get(k)} (now {config[k]})" for k in ARCHITECTURE
               if str(trained.get(k)) != str(config[k])]
    if changed:
        raise SystemExit(f"the checkpoint in {args.out_dir} was trained with {', '.join(changed)}: pass the same "
                         f"flags to resume, or a new --out_dir to start another run")
    model.load_state_dict(checkpoint["model"])
    ema.load_state_dict(checkpoint["ema"])
    diffusion.load_state_dict(checkpoint["diffusion"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for parameter, state in optimizer.state.items():  # moments keep the layout they were saved in (a GPU's NHWC):
        for name, value in state.items():  # lay them out like their parameter, which fused AdamW pairs them with
            if value.shape == parameter.shape:
                state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
    if checkpoint["scaler"]:  # empty when saved without fp16: a run may change precision between resumes
        scaler.load_state_dict(checkpoint["scaler"])
    return model, ema, diffusion, optimizer, scaler, {"step": checkpoint["step"], "rng": checkpoint["rng"]}


def save_checkpoint(path, model, ema, optimizer, scaler, diffusion, step, config, device):
    util.save_checkpoint(dict(
        model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(), diffusion=diffusion.state_dict(), step=step, config=config,
        rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
    ), path)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a machine going away, train.sh restarting), SIGHUP (a closed terminal; not under nohup) and Ctrl-C
    set a flag: the loop finishes its step, saves and exits. Yields the names received. A second Ctrl-C stops now."""
    received = []

    def request_stop(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    signums = [s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, request_stop) for signum in signums}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def ranks_agree_to_stop(stop, device):
    """Under torchrun all ranks stop at the same step (one alone would hang the others): true if any wants to. Each
    call waits for the GPU, so the loop asks every STOP_CHECK_EVERY steps, well within torchrun's 30 s grace."""
    stop = torch.tensor(float(stop), device=device)
    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return bool(stop.item())


def train(args, config, model, train_model, ema, diffusion, optimizer, scaler, batches, dataset, step, device,
          world_size, amp_dtype, received):
    """The loop, from step to --max_steps (or a stop signal in `received`, or --max_minutes). Returns the last step."""
    is_main, ckpt_path = not dist.is_initialized() or dist.get_rank() == 0, os.path.join(args.out_dir, "ckpt.pt")
    log = Log(args, step, device, args.max_skipped_steps if scaler.is_enabled() else 1, write=is_main)
    start_time, start_step, stop_reason = time.time(), step, "max_steps"
    progress = tqdm(total=args.max_steps, initial=step, disable=not is_main, desc="training", dynamic_ncols=True,
                    mininterval=1 if sys.stderr.isatty() else 30)
    grid_step = -1  # the step of the last sample grid
    while step < args.max_steps:
        x0, y = next(batches)  # (B, 3, H, W) in [-1, 1] on the device, (B,) labels or None
        loss, losses, grad_norm, finite = training_step(train_model, model, ema, diffusion, optimizer, scaler, x0,
                                                        step, args, amp_dtype, y)
        step += 1
        progress.update()
        log.add(step, loss, losses, grad_norm, finite)

        # -- logging, checkpoints, samples: the only places that wait for the device --------------------------
        at_log_step = step % args.log_every == 0 or step == args.max_steps
        at_save_step = step % args.save_every == 0 and step < args.max_steps  # the last is saved after the loop
        stop = bool(received) or (args.max_minutes > 0 and time.time() - start_time > 60 * args.max_minutes)
        if world_size > 1:
            stop = (at_log_step or step % STOP_CHECK_EVERY == 0) and ranks_agree_to_stop(stop, device)
        if at_log_step or at_save_step or stop:
            log.stop_if_diverged(scaler, ckpt_path)  # before anything is saved
        if at_log_step or stop:
            row = log.row(step, optimizer.param_groups[0]["lr"], args.batch_size * world_size, start_time, scaler)
            progress.set_postfix(loss=row["loss"] or "-", img_s=row["images_per_s"])
        if stop:
            stop_reason = f"{received[0]} received" if received else "--max_minutes reached"
            break
        if is_main and at_save_step:
            save_checkpoint(ckpt_path, model, ema, optimizer, scaler, diffusion, step, config, device)
        if is_main and args.sample_every and step % args.sample_every == 0:
            save_samples(ema, diffusion, config, step, device, dataset, amp_dtype, log.tensorboard)
            grid_step = step
        if at_log_step:
            log.clock = time.time()  # images/s counts training only, not plots, saves and grids
    if is_main:  # saved before the grid: a stop must not wait for the samples
        save_checkpoint(ckpt_path, model, ema, optimizer, scaler, diffusion, step, config, device)
        at_sample_step = args.sample_every and step % args.sample_every == 0
        if grid_step < step and (at_sample_step or stop_reason == "max_steps") and step > start_step:
            save_samples(ema, diffusion, config, step, device, dataset, amp_dtype, log.tensorboard)
    progress.close()
    if log.tensorboard is not None:
        log.tensorboard.close()
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
        with stop_signals() as received:  # from here: the loader's workers are started with the handlers in place
            try:  # check the data first: a bad folder stops the run at once, with one line saying what to do
                dataset = util.NumberedImages(args.data_dir, args.image_size, labels=args.class_cond, mirror=True)
            except (FileNotFoundError, ValueError) as error:
                raise SystemExit(f"error: {error}") from None
            config["classes"] = dataset.classes  # None, or the class names: what each label means
            model, ema, diffusion, optimizer, scaler, resumed = build_or_resume(args, config, device, amp_dtype, rank)
            step = resumed["step"] if resumed else 0
            train_model = model
            if world_size > 1:  # every rank must resume from the same checkpoint
                steps = torch.tensor([step, -step], device=device)
                dist.all_reduce(steps, op=dist.ReduceOp.MAX)
                if steps[0] != -steps[1]:
                    raise SystemExit(f"the ranks found different checkpoints in {args.out_dir} (steps {-steps[1]} to "
                                     f"{steps[0]}): on several machines --out_dir must be a folder they all share")
                train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            if args.compile:
                train_model = torch.compile(train_model)
            batches = device_batches(dataset, args, device, step, rank, world_size)
            if resumed:  # after the loader drew its worker seed: the random stream is the interrupted run's
                torch.set_rng_state(resumed["rng"]["torch"])
                if resumed["rng"]["cuda"] is not None and device.type == "cuda":
                    torch.cuda.set_rng_state(resumed["rng"]["cuda"], device)
                if world_size > 1:  # one rank's state was saved; the others get their own stream from the step
                    torch.manual_seed(args.seed + rank + 1000 * step)
            if rank == 0:
                os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
                print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(dataset.paths)} "
                      f"images, {world_size} x {device}, autocast {amp_dtype}, "
                      f"{'resuming at step ' + str(step) if step else 'starting'}", file=sys.stderr)
            return train(args, config, model, train_model, ema, diffusion, optimizer, scaler, batches, dataset, step,
                         device, world_size, amp_dtype, received)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

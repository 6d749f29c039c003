"""
Train an Improved DDPM (Nichol & Dhariwal 2021) on a folder of numbered PNGs 1.png ... N.png.

    python train.py    # the CPU demo, the bundled emoji at 32x32: 2 cores, ~6 min with AVX-512 BF16/AMX, ~14 AVX2
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
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import util
from diffusion import drop_labels
from sample import save_samples


def int_list(text):
    return tuple(int(part) for part in text.split(",") if part.strip())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--data_dir", default="data/emoji", help="folder of 1.png ... N.png (see `util.py prepare`)")
    p.add_argument("--image_size", type=int, default=32, help="other sizes are centre-cropped and resized")
    p.add_argument("--num_workers", type=int, default=None, help="loader processes (None: 2 per GPU, 0 on a CPU)")
    p.add_argument("--class_cond", action=on_off, default=False, help="condition on DATA_DIR/labels.txt's classes")
    p.add_argument("--class_dropout", type=float, default=0.1, help="chance of the null label (classifier-free)")
    p.add_argument("--super_res_from", type=int, default=None, metavar="S", help="super-resolution from S x S images")
    p.add_argument("--base_channels", type=int, default=32, help="channels at full resolution: the size knob")
    p.add_argument("--channel_mult", type=int_list, default=(1, 2, 2, 2), help="channel multiplier per level")
    p.add_argument("--num_res_blocks", type=int, default=1, help="residual blocks per level")
    p.add_argument("--attention_resolutions", type=int_list, default=(8,), help="feature-map sizes with attention")
    p.add_argument("--num_heads", type=int, default=4, help="attention heads")
    p.add_argument("--min_group_channels", type=int, default=4, help="GroupNorm: channels per group (1: DDPM's 32)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in residual blocks (train.sh: 0.1)")
    p.add_argument("--num_timesteps", type=int, default=1000, help="T, the number of noising steps")
    p.add_argument("--noise_schedule", choices=("cosine", "linear"), default="cosine", help="eq. 17, or DDPM's")
    p.add_argument("--learn_sigma", action=on_off, default=True, help="learn the reverse variances (eq. 15)")
    p.add_argument("--loss_type", choices=("hybrid", "mse", "kl"), default="hybrid",
                   help="hybrid: eq. 16; mse: L_simple (+ L_t, unweighted, to learn Sigma); kl: L_vlb")
    p.add_argument("--importance_sampling", action=on_off, default=False, help="sample t by eq. 18 (for kl)")
    p.add_argument("--batch_size", type=int, default=32, help="images per GPU (or CPU process) per step")
    p.add_argument("--microbatch", type=int, default=None, metavar="M", help="run each batch in chunks of M images")
    p.add_argument("--checkpointing", action=on_off, default=False, help="recompute activations in the backward")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup_steps", type=int, default=100, help="steps of linear learning-rate warm-up")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema_rate", type=float, default=0.9999, help="EMA decay, warmed up as (1+step)/(10+step)")
    p.add_argument("--max_steps", type=int, default=1200, help="optimiser steps in all, across resumes")
    p.add_argument("--max_minutes", type=float, default=0, help="also save and stop after this long (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, data order and noise")
    p.add_argument("--out_dir", default="runs/emoji", help="checkpoints, logs and samples; resumed from if there")
    p.add_argument("--save_every", type=int, default=500, help="write OUT/ckpt.pt every N steps")
    p.add_argument("--sample_every", type=int, default=600, help="a grid of EMA samples every N steps (0: at the end)")
    p.add_argument("--num_samples", type=int, default=36, help="images in each sample grid")
    p.add_argument("--log_every", type=int, default=50, help="a row of OUT/log.csv every N steps (and at saves, grids)")
    p.add_argument("--tensorboard", action=on_off, default=False, help="also log to OUT/tensorboard/")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 where native, else fp16 (+ loss scaling) on a GPU, else fp32")
    p.add_argument("--max_skipped_steps", type=int, default=20, help="fp16: non-finite steps in a row that stop it")
    p.add_argument("--compile", action=on_off, default=False, help="torch.compile the model (GPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    S, size = args.super_res_from, args.image_size
    if not 0 <= args.dropout < 1:
        raise SystemExit(f"error: --dropout {args.dropout} must be at least 0 and below 1 (a probability)")
    if S is not None and not 1 <= S < size:
        raise SystemExit(f"error: --super_res_from {S} must be between 1 and --image_size - 1 = {size - 1}")
    if S and args.class_cond:
        raise SystemExit("error: --super_res_from and --class_cond together are not supported; train one of the two")
    if args.microbatch is not None and not (args.microbatch >= 1 and args.batch_size % args.microbatch == 0):
        raise SystemExit(f"error: --microbatch {args.microbatch} must divide --batch_size {args.batch_size}")
    if args.max_skipped_steps < 1:
        raise SystemExit(f"error: --max_skipped_steps {args.max_skipped_steps} must be at least 1")
    return args


ARCHITECTURE = ("image_size", "base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                "num_timesteps", "noise_schedule", "learn_sigma", "loss_type", "importance_sampling", "class_cond",
                "classes", "super_res_from", "min_group_channels")  # what a resume must keep; other flags may change
LOG_COLUMNS = ("step", "loss", "mse", "vb", "lr", "grad_norm", "images_per_s", "elapsed_s", "skipped", "loss_scale")


# -- The method: a training step of Improved DDPM, and the loop that repeats it -----------------------------------
def training_step(train_model, model, ema, diffusion, optimizer, scaler, x0, step, args, amp_dtype, y=None):
    """A step on x0 (B, 3, H, W) (labels y (B,)): t, noise, loss (eq. 16), backward, AdamW, EMA. train_model: model or
    its DDP/compiled wrapper. Returns the mean loss, per-example losses, gradient norm, whether it was finite."""
    t, weights = diffusion.sample_timesteps(len(x0), x0.device)  # uniform, or by eq. 18 (weights: 1 / (T p_t))
    noise = torch.randn_like(x0)
    model_kwargs = {}  # the model's inputs beside x_t and t, if any
    if y is not None:  # classifier-free guidance: labels replaced by the null label with probability --class_dropout
        model_kwargs["y"] = drop_labels(y, args.class_dropout, model.num_classes)
    if args.super_res_from:  # super-resolution: x0 shrunk to S x S (B, 3, S, S), as sample.py --low_res reads it
        model_kwargs["low_res"] = util.downsample(x0, args.super_res_from)
    for group in optimizer.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))  # linear warm-up
    optimizer.zero_grad(set_to_none=True)
    losses = loss_and_backward(train_model, diffusion, x0, t, noise, model_kwargs, weights, scaler, args, amp_dtype)
    scaler.unscale_(optimizer)  # fp16: the true gradients, for the clip (a no-op in fp32 and bf16)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    scaler.step(optimizer)  # AdamW; fp16 skips the step if a gradient is not finite
    scaler.update()  # after a skipped step, halves the loss scale
    if diffusion.importance_sampling:
        diffusion.update_loss_history(t, losses["loss"])  # eq. 18's p_t follows these (as the reference code's)
    update_ema(ema, model, step, args.ema_rate)
    return (losses["loss"] * weights).mean(), losses, grad_norm, torch.isfinite(grad_norm)


def main(argv=None):
    """Start the processes, check the data, build or resume the model, then step until --max_steps or a stop signal."""
    args = parse_args(argv)
    config = vars(args)
    device, rank, world_size = start_processes(args)
    amp_dtype = util.autocast_dtype(device, args.precision)
    is_main = rank == 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    with stop_signals() as received:  # from here: the loader's workers are started with the handlers in place
        dataset = load_dataset(args)
        config["classes"] = dataset.classes  # None, or the class names: what each label means
        model, ema, diffusion, optimizer, scaler, step = build_or_resume(args, config, device, amp_dtype, rank)
        train_model = model  # what the step calls
        if world_size > 1:
            train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        if args.compile:
            train_model = torch.compile(train_model)
        batches = load_batches(dataset, args, step, rank, world_size, device)
        if is_main:
            os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
            start = f"resuming at step {step}" if step else "starting"
            print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(dataset.paths)} images, "
                  f"{world_size} x {device}, autocast {amp_dtype}, {start}", file=sys.stderr)
        log = Log(args, step, args.max_skipped_steps if scaler.is_enabled() else 1, write=is_main)  # OUT/log.csv
        progress = tqdm(total=args.max_steps, initial=step, disable=not is_main, desc="training", dynamic_ncols=True,
                        mininterval=1 if sys.stderr.isatty() else 30, smoothing=0)  # time left: grids, saves too
        start_step = step
        stop_reason = None
        while step < args.max_steps and stop_reason is None:
            x0, y = next(batches)  # (B, 3, H, W) in [-1, 1] on the device; (B,) labels, or None
            loss, losses, grad_norm, finite = training_step(train_model, model, ema, diffusion, optimizer, scaler, x0,
                                                            step, args, amp_dtype, y)
            step += 1
            progress.update()
            log.add(loss, losses, grad_norm, finite)
            # -- a log row, a checkpoint, a sample grid: the only places that wait for the device -----------------
            stop = bool(received) or (args.max_minutes > 0 and time.time() - log.start_time > 60 * args.max_minutes)
            if world_size > 1:  # all ranks stop at the same step; agreeing waits for the GPU, so every 10 steps
                stop = ranks_agree_to_stop(stop, device) if step % 10 == 0 else False
            at_save_step = step % args.save_every == 0 or step == args.max_steps or stop
            at_sample_step = step == args.max_steps or (args.sample_every > 0 and step % args.sample_every == 0)
            if not (step % args.log_every == 0 or at_save_step or at_sample_step):
                continue
            row = log.row(step, optimizer.param_groups[0]["lr"], args.batch_size * world_size, scaler, ckpt_path)
            progress.set_postfix(loss=row["loss"] or "-", img_s=row["images_per_s"])
            if is_main and at_save_step:  # before the grid: a stop must not wait for the samples
                save_checkpoint(ckpt_path, model, ema, optimizer, scaler, diffusion, step, config, device)
            if is_main and at_sample_step:
                save_samples(ema, diffusion, config, step, device, dataset, amp_dtype, log.tensorboard)
            if stop:
                stop_reason = f"{received[0]} received" if received else "--max_minutes reached"
            log.clock = time.time()  # images/s counts training only, not plots, saves and grids
        if is_main and step == start_step:  # --max_steps 0, or a run resumed at its end: saved as it is
            save_checkpoint(ckpt_path, model, ema, optimizer, scaler, diffusion, step, config, device)
        if is_main:
            print(f"stopped at step {step} ({stop_reason or 'max_steps'}); checkpoint: {ckpt_path}", file=sys.stderr)
        progress.close()
        if log.tensorboard is not None:
            log.tensorboard.close()
    # Only here, at a clean end: after an exception NCCL's destroy would wait for collectives the other ranks never
    # join, a hang; a rank that exits without it lets torchrun see the failure and stop the others
    if dist.is_initialized():
        dist.destroy_process_group()
    return step


# -- The step's parts: the backward in chunks, the EMA ------------------------------------------------------------
def loss_and_backward(train_model, diffusion, x0, t, noise, model_kwargs, weights, scaler, args, amp_dtype):
    """The per-example losses (diffusion.training_losses) and the gradients of their weighted mean, under autocast, in
    chunks of --microbatch images: the same step but for rounding and dropout, whose masks are drawn chunk by chunk."""
    B = len(x0)
    chunk = args.microbatch or B
    chunk_losses = []
    for start in range(0, B, chunk):
        part = slice(start, start + chunk)
        last = start + chunk >= B  # DDP all-reduces the gradients in every backward: once, after the last, is enough
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
    return {key: torch.cat([part[key] for part in chunk_losses]) for key in chunk_losses[0]}


def update_ema(ema, model, step, rate):
    """EMA (DDPM, sec. 4): ema += (1 - decay) (model - ema), in place, the decay warmed up so that short runs get a
    useful one. After a skipped fp16 step the weights are as they were, and the EMA moves towards them as usual."""
    decay = min(rate, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def build_optimizer(model, args):
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)  # 1 kernel


# -- Data: util.NumberedImages and their mirror images, in a seeded order -----------------------------------------
def load_dataset(args):
    """The images and, as N more, their mirror images: the random flip, drawn by the seeded order below, so that a
    resumed run sees the same batches. A bad folder stops the run at once, in one line."""
    try:
        return util.NumberedImages(args.data_dir, args.image_size, labels=args.class_cond, mirror=True)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def load_batches(dataset, args, step, rank, world_size, device):
    """Batches (x0, y) on the device, forever, from step `step` on; y is None without --class_cond."""
    sampler = shuffle_forever(len(dataset), args.seed, step * args.batch_size, rank, world_size)
    workers = (2 if device.type == "cuda" else 0) if args.num_workers is None else args.num_workers  # CPU cores train
    # Workers forked, as on Linux before Python 3.14: its new default, forkserver, starts a server process in our
    # process group, where the SIGTERM or Ctrl-C meant for us kills it, and the workers with it
    fork = "fork" if sys.platform == "linux" and workers > 0 else None
    loader = torch.utils.data.DataLoader(  # its own generator: the run's random stream is the model's alone
        dataset, args.batch_size, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(0),
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        worker_init_fn=leave_process_group, multiprocessing_context=fork)
    for batch in loader:
        x0, y = batch if args.class_cond else (batch, None)
        x0 = x0.to(device, non_blocking=True, memory_format=memory_format(device))
        yield x0, (None if y is None else y.to(device, non_blocking=True))


def shuffle_forever(size, seed, start=0, rank=0, world_size=1):
    """Dataset indices reshuffled every epoch, forever, in an order set by the seed alone, so that a run resumed at
    step s skips the s * batch_size indices used. Under DDP rank r takes every world_size-th index."""
    per_rank = size // world_size  # the same count on every rank, so no rank waits for another
    epoch, offset = divmod(start, per_rank)
    while True:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch))
        yield from order[rank::world_size][:per_rank][offset:].tolist()
        epoch += 1
        offset = 0


def leave_process_group(worker_id):
    os.setpgid(0, 0)  # torchrun and Ctrl-C signal the process group: in one of its own a worker outlives the save


# -- Outputs: log.csv, loss.png, TensorBoard (the sample grids: sample.save_samples) ------------------------------
class Log:
    """log.csv (+ loss.png, TensorBoard): at each log, save and sample step a row of means over the finite steps since
    the last, kept on the device till then. A row first stops the run unsaved at `limit` non-finite steps in a row."""

    def __init__(self, args, step, limit, write):
        self.path = Path(args.out_dir, "log.csv")
        self.limit = limit
        self.write = write
        self.last_step = step
        self.start_time = time.time()
        self.clock = self.start_time  # the start of the steps the next row counts
        self.steps = []  # each step's (loss, mse, vb, grad norm, finite), on the device till the next row
        self.in_a_row = 0  # non-finite steps in a row
        self.tensorboard = None
        if write:  # on a resume the rows after the checkpoint go; the rest are kept, and plotted, with the new ones
            kept = self.path.read_text().splitlines(keepends=True)[1:] if step and self.path.exists() else []
            kept = [line for line in kept if int(line.split(",")[0]) <= step]
            self.path.write_text(",".join(LOG_COLUMNS) + "\n" + "".join(kept))
            self.rows = list(csv.DictReader([",".join(LOG_COLUMNS), *kept]))
        if write and args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(f"{args.out_dir}/tensorboard", purge_step=step or None, flush_secs=10)
            except ImportError:
                print("tensorboard is not installed, so no OUT/tensorboard/: pip install tensorboard", file=sys.stderr)

    def add(self, loss, losses, grad_norm, finite_step):
        vb = losses["vb"].mean() if "vb" in losses else torch.full_like(loss, float("nan"))  # NaN: no vb column
        self.steps.append(torch.stack([loss, losses["mse"].mean(), vb, grad_norm, finite_step]).detach().float())

    def row(self, step, lr, images_per_step, scaler, ckpt_path):
        steps = torch.stack(self.steps)  # (steps, 5)
        self.steps = []
        if dist.is_initialized():  # the mean over the ranks, as for the gradients (norm and finiteness agree already)
            dist.all_reduce(steps)
            steps /= dist.get_world_size()
        steps = steps.tolist()  # the one wait for the device
        for n, (*_, finite) in enumerate(steps, start=self.last_step + 1):
            self.in_a_row = 0 if finite else self.in_a_row + 1
            if self.in_a_row >= self.limit:
                what = (f"{self.limit} steps in a row up to step {n} had a loss or gradients that were not finite, "
                        f"with the fp16 loss scale down to {scaler.get_scale():g}" if scaler.is_enabled() else
                        f"the loss or gradients became non-finite at step {n}")
                raise SystemExit(f"error: {what}; stopped without saving, the last good checkpoint is {ckpt_path}. "
                                 f"Try a lower --lr, --precision fp32 or, with fp16, a larger --max_skipped_steps")
        finite = [values[:4] for values in steps if values[4]]  # a skipped step's NaNs stay out of the means
        means = [sum(column) / len(finite) for column in zip(*finite)] if finite else [math.nan] * 4
        loss, mse, vb, grad_norm = [f"{mean:{digits}}" if math.isfinite(mean) else ""  # "": all skipped, or no vb
                                    for mean, digits in zip(means, (".6f", ".6f", ".5f", ".4f"))]
        images_per_s = (step - self.last_step) * images_per_step / (time.time() - self.clock)
        scale = f"{scaler.get_scale():g}" if scaler.is_enabled() else ""
        row = dict(step=step, loss=loss, mse=mse, vb=vb, lr=f"{lr:.3g}", grad_norm=grad_norm,
                   images_per_s=f"{images_per_s:.1f}", elapsed_s=f"{time.time() - self.start_time:.1f}",
                   skipped=len(steps) - len(finite), loss_scale=scale)
        self.last_step = step
        for column, value in list(row.items())[1:]:
            if self.tensorboard and value != "":
                self.tensorboard.add_scalar(f"train/{column}", float(value), step)
        if self.write:
            with open(self.path, "a") as f:
                f.write(",".join(map(str, row.values())) + "\n")
            self.rows.append(row)  # loss.png, of every row
            ax = Figure(figsize=(7, 4)).subplots()
            for key in ("loss", "mse", "vb"):
                points = [(int(r["step"]), float(r[key])) for r in self.rows if r[key]]  # "": all skipped, or no vb
                if points:
                    ax.plot(*zip(*points), label=key)
            ax.set(xlabel="training step", ylabel="loss (log scale)", yscale="log", title="mean over each log interval")
            ax.legend()
            ax.figure.savefig(self.path.with_name("loss.tmp.png"), dpi=100)
            os.replace(self.path.with_name("loss.tmp.png"), self.path.with_name("loss.png"))
        return row


# -- Processes and devices; building, resuming and saving; stopping -----------------------------------------------
def start_processes(args):
    """(device, rank, world size); under torchrun a process group, NCCL between GPUs, gloo between CPU processes."""
    device = util.pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:1 in one process too: its random stream is the one sampling uses
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere on: TF32 matmuls and convolutions, as good, faster
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # destroyed at the end of main, and only there (see there)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(args.seed + rank)  # the CPU's and every GPU's stream
    return device, rank, world_size


def memory_format(device):
    """The layout of the weights and images: NHWC (channels_last) on a GPU, for its tensor cores; on a CPU as it is."""
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def build_or_resume(args, config, device, amp_dtype, rank=0):
    """(model, EMA, process, optimiser, scaler, step): new at step 0, or OUT's checkpoint's, random stream and all."""
    model, diffusion = util.build_model_and_diffusion(config)
    model.to(device, memory_format=memory_format(device))
    diffusion.to(device)
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # the weights we sample from
    checkpoint = util.resume_checkpoint(args.out_dir, rank)
    if checkpoint is None:
        return model, ema, diffusion, optimizer, scaler, 0
    check_architecture(checkpoint["config"], config, args.out_dir)
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
    restore_random_state(checkpoint, args.seed, rank, device)
    return model, ema, diffusion, optimizer, scaler, checkpoint["step"]


def check_architecture(saved, config, out_dir):
    """Stop with one line if the checkpoint's model or process is not the one these flags build."""
    saved = {"class_cond": False, "classes": None, "super_res_from": None, "min_group_channels": 1,
             **saved}  # older checkpoints: no classes, no super-resolution, DDPM's GroupNorm rule
    changed = [f"--{k} {saved.get(k)} (now {config[k]})" for k in ARCHITECTURE if str(saved.get(k)) != str(config[k])]
    if changed:
        raise SystemExit(f"the checkpoint in {out_dir} was trained with {', '.join(changed)}: pass the same "
                         f"flags to resume, or a new --out_dir to start another run")


def restore_random_state(checkpoint, seed, rank, device):
    """One process: the saved random streams, the CPU's and the GPU's, so that the run goes on as if it never
    stopped. Under DDP one rank's state was saved: each rank takes a stream of its own from the step."""
    if dist.is_initialized():
        torch.manual_seed(seed + rank + 1000 * checkpoint["step"])
        return
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)


def save_checkpoint(path, model, ema, optimizer, scaler, diffusion, step, config, device):
    rng = dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    util.save_checkpoint(dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                              scaler=scaler.state_dict(), diffusion=diffusion.state_dict(), step=step, config=config,
                              rng=rng), path)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM, SIGHUP (unless ignored: nohup) and Ctrl-C put their name in the list yielded; a 2nd Ctrl-C: at once."""
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
    """Whether any rank wants to stop: all stop at one step (one alone would hang the others). One value read back."""
    flag = torch.full((), float(stop), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


if __name__ == "__main__":
    main()

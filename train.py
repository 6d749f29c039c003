"""
Train an Improved DDPM (Nichol & Dhariwal 2021) on a folder of numbered PNGs 1.png ... N.png.

    python train.py                                   # CPU demo: bundled emoji, 32x32, about 10 minutes
    sh train.sh                                       # the 64x64 anime-faces recipe on one or more GPUs
    torchrun --standalone --nproc_per_node=4 train.py  # several GPUs with DistributedDataParallel

Everything lands in --out_dir: ckpt.pt (model, EMA, optimiser, config: enough to resume or sample), log.csv,
loss.png and samples/STEP.png. A run resumes from OUT/ckpt.pt when it exists. SIGTERM or Ctrl-C saves and exits.
Then look at the model with `python eval.py OUT/ckpt.pt`, or generate images with `python sample.py OUT/ckpt.pt`.
"""
import argparse
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
                   help="also stop after this many minutes of this run (0 = no limit): a rented-GPU budget")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order and noise")
    g = p.add_argument_group("run")
    g.add_argument("--out_dir", default="runs/emoji",
                   help="checkpoint, logs and samples go here; resumes from OUT/ckpt.pt")
    g.add_argument("--save_every", type=int, default=500,
                   help="write OUT/ckpt.pt every N steps (also at the end and on SIGTERM/Ctrl-C)")
    g.add_argument("--sample_every", type=int, default=500,
                   help="write a grid of EMA samples (50 respaced steps) every N steps (0 = only at the end)")
    g.add_argument("--num_samples", type=int, default=36, help="images in each sample grid")
    g.add_argument("--log_every", type=int, default=50,
                   help="append to OUT/log.csv and redraw OUT/loss.png every N steps")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast: auto = bf16 where the hardware has it (GPUs from Ampere on, CPUs with AVX-512 BF16 "
                   "or AMX), else fp16 with a gradient scaler on a GPU, else fp32. bf16 elsewhere is emulated: slow")
    g.add_argument("--compile", action=on_off, default=False,
                   help="torch.compile the model (faster on GPU after a minute of compiling)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on stopping, under torchrun

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


# ----------------------------------------------------------------------------------------------------------
# Outputs


def save_samples(ema, diffusion, config, step, device, dataset):
    """OUT/samples/STEP.png: a grid of EMA samples drawn with 50 respaced steps (sec. 4), quick and close to the
    quality of all T steps when the variances are learned. Class-conditional: a row per class (the first 8).
    Super-resolution: the first training images, in rows of three: low-res input, the model's sample, original."""
    num, nrow, model_kwargs = config["num_samples"], None, {}
    size, low_res_size = config["image_size"], config["super_res_from"]
    if config["classes"]:
        rows = min(8, len(config["classes"]))
        nrow = max(1, num // rows)
        num = rows * nrow
        model_kwargs["y"] = torch.arange(rows, device=device).repeat_interleave(nrow)  # row r: class r
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
    util.save_image_grid(samples, os.path.join(config["out_dir"], "samples", f"{step:06d}.png"), nrow=nrow)


def plot_losses(log_path, png_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed, so no loss.png: pip install matplotlib", file=sys.stderr)
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    steps = [int(row["step"]) for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "mse", "vb"):
        if rows and rows[0][key] != "":
            ax.plot(steps, [float(row[key]) for row in rows], label=key)
    ax.set(xlabel="step", yscale="log", title="training loss (mean over each log interval)")
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
    DDP or torch.compile wrapper. Returns the weighted mean loss, the per-example losses and the gradient norm, left
    on the device: reading them would make the CPU wait for the GPU."""
    t, weights = diffusion.sample_timesteps(x0.shape[0], x0.device)  # weights: importance sampling's 1 / (T p_t)
    model_kwargs = {}
    if y is not None:
        model_kwargs["y"] = drop_labels(y, args.class_dropout, model.num_classes)
    if args.super_res_from:  # the condition: x0 shrunk to S x S and enlarged back, (B, 3, H, W)
        model_kwargs["low_res"] = util.upsample(util.downsample(x0, args.super_res_from), x0.shape[-1])
    with util.autocast(x0.device, amp_dtype):
        losses = diffusion.training_losses(train_model, x0, t, model_kwargs=model_kwargs)
    loss = (losses["loss"] * weights).mean()
    for group in optimizer.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))  # linear warm-up
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # the scaler multiplies fp16 losses so small gradients do not flush to zero
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
    scaler.step(optimizer)
    scaler.update()
    if diffusion.importance_sampling:
        diffusion.update_loss_history(t, losses["loss"])
    decay = min(args.ema_rate, (1 + step) / (10 + step))  # EMA warm-up: short runs still get a useful EMA
    with torch.no_grad():  # ema = decay * ema + (1 - decay) * model, all tensors in one call, not one launch each
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    return loss, losses, grad_norm


def build_optimizer(model, args):
    # fused: one kernel for all parameters, and with fp16's GradScaler the skipped-step check happens on the device
    # instead of a .item() every step (torch >= 2.4 has it on the CPU and CUDA)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)


def main(argv=None):
    args = parse_args(argv)
    config = vars(args)

    # -- processes and devices: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE --------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = util.pick_device(args.device)
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = rank == 0
    util.seed_everything(args.seed + rank)
    amp_dtype = util.autocast_dtype(device, args.precision)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convs on Ampere+: same results, faster
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    if not 0 <= args.dropout < 1:
        raise SystemExit(f"error: --dropout {args.dropout} must be at least 0 and below 1: it is the probability of "
                         "zeroing each activation in a residual block (0.1 by default)")
    if args.super_res_from is not None and not 1 <= args.super_res_from < args.image_size:
        raise SystemExit(f"error: --super_res_from {args.super_res_from} must be between 1 and --image_size - 1 = "
                         f"{args.image_size - 1}: the model makes {args.image_size}px images from smaller ones")
    if args.super_res_from and args.class_cond:
        raise SystemExit("error: --super_res_from and --class_cond together are not supported; train one of the two")
    try:  # check the data first: a bad folder stops the run at once, with one line saying what to do
        dataset = util.NumberedImages(args.data_dir, args.image_size, labels=args.class_cond)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    config["classes"] = dataset.classes  # None, or the class names: the checkpoint says what each label means

    # -- model, process, optimiser --------------------------------------------------------------------------
    model, diffusion = util.build_model_and_diffusion(config)
    model.to(device)
    diffusion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # NHWC convs use tensor cores without layout transposes
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling

    # -- resume ---------------------------------------------------------------------------------------------
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    step, checkpoint = 0, None
    if os.path.exists(ckpt_path):
        try:
            checkpoint = util.load_checkpoint(ckpt_path, map_location=device)
        except ValueError as error:
            raise SystemExit(f"error: {error}; move it away to start a new run in {args.out_dir}") from None
        # older checkpoints: no classes, no super-resolution, DDPM's GroupNorm rule
        trained = {"class_cond": False, "classes": None, "super_res_from": None, "min_group_channels": 1,
                   **checkpoint["config"]}
        changed = [f"--{k} {trained.get(k)} (now {config[k]})" for k in ARCHITECTURE
                   if trained.get(k) != config[k] and str(trained.get(k)) != str(config[k])]
        if changed:
            raise SystemExit(f"{ckpt_path} was trained with {', '.join(changed)}: pass the same flags to resume, "
                             f"or a new --out_dir to start another run")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        diffusion.load_state_dict(checkpoint["diffusion"])
        step = checkpoint["step"]
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # the weights we sample from (EMA, sec. 4 of DDPM)
    if checkpoint is not None:
        ema.load_state_dict(checkpoint["ema"])
    if distributed:  # every rank must resume from the same checkpoint: a machine without it would start afresh
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise SystemExit(f"the ranks found different checkpoints in {args.out_dir} (steps {-steps[1]} to "
                             f"{steps[0]}): on several machines --out_dir must be a folder they all share")
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    else:
        train_model = model
    if args.compile:
        train_model = torch.compile(train_model)

    sampler = ShuffleForever(len(dataset), args.seed, start=step * args.batch_size, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0, drop_last=True)
    batches = iter(loader)
    if checkpoint is not None:  # after the loader drew its worker seed, so the random stream is the interrupted run's
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        if checkpoint["rng"]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), device)
        if world_size > 1:  # one rank's state was saved; the others get their own stream from the step
            torch.manual_seed(args.seed + rank + 1000 * step)

    def save():
        """Write OUT/ckpt.pt atomically (util.save_checkpoint), and never from weights that are not finite."""
        if not is_main:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            return print(f"weights are not finite at step {step}: kept the last good {ckpt_path}", file=sys.stderr)
        util.save_checkpoint(dict(
            model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(), diffusion=diffusion.state_dict(), step=step, config=config,
            rng=dict(torch=torch.get_rng_state(),
                     cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None),
        ), ckpt_path)

    # -- SIGTERM (rented machine going away, train.sh restarting) and Ctrl-C: finish the step, save, exit ---
    stop_signal = []
    previous_handlers = {}

    def request_stop(signum, frame):
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        stop_signal.append(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous_handlers[signum] = signal.signal(signum, request_stop)

    log_path = os.path.join(args.out_dir, "log.csv")
    if is_main:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        num_params = sum(p.numel() for p in model.parameters())
        print(f"{num_params / 1e6:.2f}M parameters, {len(dataset) // 2} images, {world_size} x {device}, "
              f"autocast {amp_dtype}, {'resuming at step ' + str(step) if step else 'starting'}", file=sys.stderr)
        kept = []  # a run killed after its last save logged steps that this one will redo: drop those rows
        if step and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f.readlines()[1:] if int(line.split(",")[0]) <= step]
        with open(log_path, "w") as f:
            f.write("step,loss,mse,vb,lr,grad_norm,images_per_s,elapsed_s\n" + "".join(kept))
    # Sums over the log interval stay on the device: reading them every step would stall the GPU.
    sums = torch.zeros(4, device=device)  # loss, mse, vb, grad norm
    first_nonfinite_step = torch.tensor(-1, device=device)
    start_time = last_log_time = time.time()
    last_log_step = step
    progress = tqdm(total=args.max_steps, initial=step, disable=not is_main, desc="training", dynamic_ncols=True,
                    mininterval=1 if sys.stderr.isatty() else 30)
    stop_reason = "max_steps"
    try:
        while step < args.max_steps:
            x0, y = next(batches) if args.class_cond else (next(batches), None)  # (B, 3, H, W) in [-1, 1], (B,)
            x0 = x0.to(device, non_blocking=True)
            y = y if y is None else y.to(device, non_blocking=True)
            if device.type == "cuda":
                x0 = x0.contiguous(memory_format=torch.channels_last)
            loss, losses, grad_norm = training_step(train_model, model, ema, diffusion, optimizer, scaler, x0, step,
                                                    args, amp_dtype, y)
            lr = optimizer.param_groups[0]["lr"]
            step += 1
            progress.update()
            vb = losses["vb"].mean() if "vb" in losses else torch.zeros((), device=device)
            sums += torch.stack([loss.detach(), losses["mse"].mean().detach(), vb.detach(), grad_norm.float()])
            is_first_nonfinite = (first_nonfinite_step < 0) & ~torch.isfinite(loss)
            first_nonfinite_step = torch.where(is_first_nonfinite, step, first_nonfinite_step)

            # -- logging, samples, checkpoints: the only places that wait for the device --------------------
            at_log_step = step % args.log_every == 0 or step == args.max_steps
            stop = bool(stop_signal) or (args.max_minutes > 0 and time.time() - start_time > 60 * args.max_minutes)
            if distributed and (at_log_step or step % STOP_CHECK_EVERY == 0):
                # The ranks agree on when to stop (a rank stopping alone would hang the others). Not every step:
                # the .item() waits for the GPU. Often enough that torchrun's 30 s between forwarding SIGTERM
                # and SIGKILL leaves time to save.
                stop = torch.tensor(float(stop), device=device)
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                stop = bool(stop.item())
            elif distributed:
                stop = False
            if at_log_step or stop:
                if first_nonfinite_step.item() >= 0:
                    raise FloatingPointError(
                        f"the loss became {loss.item()} at step {first_nonfinite_step.item()}; stopped without saving, "
                        f"the last good checkpoint is {ckpt_path}. Try a lower --lr, or --precision fp32 or bf16")
                now = time.time()
                averages = (sums / (step - last_log_step)).tolist()
                images_per_s = (step - last_log_step) * args.batch_size * world_size / (now - last_log_time)
                sums.zero_()
                last_log_step = step
                if is_main:
                    progress.set_postfix(loss=f"{averages[0]:.4f}", img_s=f"{images_per_s:.1f}")
                    vb_text = f"{averages[2]:.5f}" if "vb" in losses else ""
                    with open(log_path, "a") as f:
                        f.write(f"{step},{averages[0]:.6f},{averages[1]:.6f},{vb_text},{lr:.3g},{averages[3]:.4f},"
                                f"{images_per_s:.1f},{now - start_time:.1f}\n")
                    plot_losses(log_path, os.path.join(args.out_dir, "loss.png"))
            if is_main and args.sample_every and step % args.sample_every == 0:
                save_samples(ema, diffusion, config, step, device, dataset)
            if step % args.save_every == 0 and step < args.max_steps:
                save()
            if at_log_step:
                last_log_time = time.time()  # images/s counts training only, not the plotting, sampling and saving
            if stop:
                stop_reason = f"{stop_signal[0]} received" if stop_signal else "--max_minutes reached"
                break
        save()
        if is_main and (not args.sample_every or step % args.sample_every) and stop_reason == "max_steps":
            save_samples(ema, diffusion, config, step, device, dataset)
        progress.close()
        if is_main:
            print(f"stopped at step {step} ({stop_reason}); checkpoint: {ckpt_path}", file=sys.stderr)
    finally:
        progress.close()  # also when an error ends the run (closing twice is harmless)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if distributed:
            dist.destroy_process_group()
    return step


if __name__ == "__main__":
    main()

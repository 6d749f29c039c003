"""
Benchmarks, not tests: pytest collects only test_*.py. One table of what this machine does with each model:

    python tests/bench.py                                          # demo and small32 on this device
    python tests/bench.py --device cuda --config anime64 --compile --json bench.json
    python tests/bench.py --estimate_gpu_memory                    # train.sh's GPU memory, estimated on the CPU
    python tests/bench.py --memory_options --config anime64        # the speed --checkpointing and --microbatch cost

For each configuration, and each precision the device runs natively (fp32 always, TF32 on CUDA; bf16 on CPUs
with AVX-512 BF16 or AMX and on GPUs from Ampere on; fp16 with a gradient scaler on CUDA, not on the CPU, where its
convolution backward has no fast kernel), eager and, with --compile, torch.compiled:
    train img/s   forward + backward + AdamW + EMA: train.training_step, exactly the step train.py runs
    MFU           model FLOP utilisation: FLOPs per image (FlopCounterMode) x img/s / the matmul peak of the
                  device at that precision, measured in the same run
    conv MFU      the same for the convolutions alone (forward and backward, timed by torch.profiler): what the
                  device's convolution kernels reach at these shapes, and roughly the most the step's MFU can be
    conv share    the part of the step's time spent in convolutions; the rest is normalisation, activations,
                  attention, the loss and the optimiser
    peak GiB      CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident memory (VmHWM, reset
                  before each row)
    sample img/s  one denoising step of the model in eval mode, at a batch of 16 (a grid)
    grid 50/1000  wall seconds for a grid of 16 with 50 and with 1000 steps; "~" marks 1000-step times worked
                  out from the 50-step one (20x) where running them would take over a minute
Every figure is the median of --repeats timings after a warm-up; CUDA timings synchronize before reading the
clock.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for its modules
# the profiler's C++ log: without this, a CUDA build on a machine without a GPU prints "ERROR ... gpuGetDeviceCount"
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch
from torch.utils.flop_counter import FlopCounterMode

import train
import unet
import util

# The model flags of each configuration; the rest are train.py's defaults.
CONFIGS = {
    "demo": [],  # train.py's defaults: the CPU demo
    "small32": ["--base_channels", "64", "--channel_mult", "1,2,2,2", "--num_res_blocks", "2",
                "--attention_resolutions", "16,8", "--dropout", "0.1"],  # Improved DDPM's CIFAR-10 layout, CPU-sized
    "anime64": ["--image_size", "64", "--base_channels", "128", "--channel_mult", "1,2,3,4", "--num_res_blocks", "2",
                "--attention_resolutions", "16,8", "--dropout", "0.1", "--batch_size", "64", "--lr", "1e-4",
                "--num_workers", "8"],  # train.sh's model and loader
}
GRID = 16  # images in a sample grid, as eval.py draws them


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--config", default=None,
                   help=f"comma-separated, from {', '.join(CONFIGS)} (None: all on CUDA, demo,small32 on the CPU)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch (None: each config's own)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models (minutes to compile)")
    p.add_argument("--repeats", type=int, default=5, help="timings per figure; the median is reported")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table and the machine to FILE")
    p.add_argument("--memory_options", action="store_true",
                   help="only time the training step with --checkpointing and --microbatch B/2 and B/4 against the "
                   "plain one, in alternating rounds (and their peak memory on CUDA), for each --config")
    p.add_argument("--estimate_gpu_memory", action="store_true",
                   help="only estimate train.sh's GPU memory from the tensors saved for backward, on the CPU")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------------
# Measuring


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 2 ** 20
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def matmul_peak(device, dtype, repeats):
    """FLOP/s of a large square matmul: the most this device does at this precision, as a denominator for MFU."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    calls = 20 if device.type == "cuda" else 4
    best = min(median_seconds(lambda: [a @ b for _ in range(calls)], device, 1) for _ in range(2 * repeats))
    return 2 * n ** 3 * calls / best  # the best of the timings: a peak, not a typical figure


def precisions(device):
    """(name, autocast dtype) of each precision the device runs natively."""
    found = [("fp32", None)]
    if util.native_bf16(device):
        found.append(("bf16", torch.bfloat16))
    if device.type == "cuda":
        found.append(("fp16", torch.float16))
    return found


# ----------------------------------------------------------------------------------------------------------
# One configuration


def build(config_name, batch_size, device):
    """The model, EMA, process, optimiser and args of train.py for one configuration."""
    flags = CONFIGS[config_name] + (["--batch_size", str(batch_size)] if batch_size else [])
    args = train.parse_args(flags)
    torch.manual_seed(0)
    model, diffusion = util.build_model_and_diffusion(vars(args))
    model.to(device)
    diffusion.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = train.build_optimizer(model, args)
    return args, model, ema, diffusion, optimizer


def bench_training(config_name, args, model, ema, diffusion, optimizer, device, precision, amp_dtype, compiled,
                   repeats, peaks):
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    if device.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    train_model = model
    compile_seconds = None
    if compiled:
        train_model = torch.compile(model)
        start = time.perf_counter()
        train.training_step(train_model, model, ema, diffusion, optimizer, scaler, x0, 1000, args, amp_dtype)
        synchronize(device)
        compile_seconds = time.perf_counter() - start

    def step():
        train.training_step(train_model, model, ema, diffusion, optimizer, scaler, x0, 1000, args, amp_dtype)

    reset_peak_memory(device)
    seconds = median_seconds(step, device, repeats)
    memory = peak_memory_gib(device)
    with FlopCounterMode(display=False) as counter:  # counts matmuls, convs and attention, forward and backward
        train.training_step(model, model, ema, diffusion, optimizer, scaler, x0, 1000, args, amp_dtype)
    flops_per_image = counter.get_total_flops() / args.batch_size
    images_per_s = args.batch_size / seconds
    row = dict(config=config_name, precision=precision, mode="compiled" if compiled else "eager",
               batch=args.batch_size, train_img_s=images_per_s, gflop_per_img=flops_per_image / 1e9,
               mfu=flops_per_image * images_per_s / peaks[precision], peak_gib=memory, compile_s=compile_seconds)
    if not compiled:  # compiled code does not show its convolutions to the profiler as aten::convolution
        conv_flops = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
        conv_seconds, step_seconds = convolution_seconds(step, device)
        row.update(conv_share=conv_seconds / step_seconds, conv_mfu=conv_flops / conv_seconds / peaks[precision])
    return row


def convolution_seconds(step, device):
    """(seconds in convolutions, forward and backward, seconds in all) of one profiled call of step. The
    convolutions are most of a training step's FLOPs, so their own FLOP/s roughly bound the step's MFU: the rest
    of the step (attention aside, all of it slower per FLOP) can only lower it."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds = time.perf_counter() - start
    conv_us = 0
    for event in profile.key_averages():  # aten::convolution holds the forward kernels it calls
        if event.key in ("aten::convolution", "aten::convolution_backward"):
            conv_us += event.device_time_total if device.type == "cuda" else event.cpu_time_total
    return conv_us / 1e6, seconds


def bench_sampling(args, ema, diffusion, device, amp_dtype, repeats):
    ema = copy.deepcopy(ema).to(memory_format=torch.channels_last)  # as util.load_model gives it to eval.py
    noise = torch.randn(GRID, 3, args.image_size, args.image_size, device=device)

    def grid(steps):
        with util.autocast(device, amp_dtype):
            diffusion.sample(ema, noise.shape, steps=steps, noise=noise)

    def one_step():  # what every sampling step does: the network, then the mean and variance of p(x_{t-1} | x_t)
        with torch.no_grad(), util.autocast(device, amp_dtype):
            diffusion.p_mean_variance(ema, noise, torch.full((GRID,), 500, device=device))

    step_seconds = median_seconds(one_step, device, repeats)
    grid50 = median_seconds(lambda: grid(50), device, max(1, repeats // 2), warmup=0)
    T = diffusion.num_timesteps
    if grid50 * T / 50 <= 60:
        grid_T, derived = median_seconds(lambda: grid(T), device, 1, warmup=0), ""
    else:
        grid_T, derived = grid50 * T / 50, "~"
    return dict(sample_img_s=GRID / step_seconds, grid50_s=grid50, grid1000_s=grid_T, grid1000_derived=derived)


def bench_memory_options(config_name, batch_size, device, repeats):
    """Images/s of the training step with each way of saving memory, as a ratio to the plain step. The variants
    run in turn, one step each, in `repeats` rounds after a warm-up round; the ratio is the median over the rounds
    of each round's own ratio, so that a machine slowing down or speeding up between rounds cancels out."""
    amp_dtype = util.autocast_dtype(device, "auto")
    flags = CONFIGS[config_name] + (["--batch_size", str(batch_size)] if batch_size else [])
    B = train.parse_args(flags).batch_size
    variants = []
    for microbatch in (None, B // 2, B // 4):
        for checkpointing in (False, True):
            options = ["--checkpointing"] if checkpointing else []
            if microbatch:
                options += ["--microbatch", str(microbatch)]
            fits, needed, free = (True, 0, 0)
            if device.type == "cuda":  # those that fit the GPU's free memory
                fits, needed, free = fits_on_gpu(flags + options, "fp32" if amp_dtype is None else "bf16", device)
            if fits:
                variants.append((microbatch, checkpointing))
            else:
                print(f"{' '.join(options) or 'plain'}: skipped, needs ~{needed:.1f} GiB, {free:.1f} GiB free")
    args, model, ema, diffusion, optimizer = build(config_name, batch_size, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    x0 = torch.rand(B, 3, args.image_size, args.image_size, device=device) * 2 - 1
    if device.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    seconds, peaks = {variant: [] for variant in variants}, {}
    for round in range(repeats + 1):
        for microbatch, checkpointing in variants:
            args.microbatch, model.checkpointing = microbatch, checkpointing
            reset_peak_memory(device)
            step_seconds = median_seconds(lambda: train.training_step(model, model, ema, diffusion, optimizer, scaler,
                                                                      x0, 1000, args, amp_dtype), device, 1, warmup=0)
            if round:
                seconds[microbatch, checkpointing].append(step_seconds)
                peaks[microbatch, checkpointing] = peak_memory_gib(device)
    print(f"{config_name}, batch {B}, {'fp32' if amp_dtype is None else str(amp_dtype)[6:]}, {repeats} rounds:")
    print("microbatch  checkpointing  train img/s  vs first" + ("  peak GiB" if device.type == "cuda" else ""))
    plain = seconds[variants[0]]  # the plain step, unless it did not fit
    for (microbatch, checkpointing), times in seconds.items():
        ratio = statistics.median(p / t for p, t in zip(plain, times))
        peak = f"  {peaks[microbatch, checkpointing]:8.2f}" if device.type == "cuda" else ""
        print(f"{microbatch or '-':>10}  {'yes' if checkpointing else 'no':>13}  {B / statistics.median(times):11.1f}"
              f"  {ratio:7.2f}x{peak}")


def bench_loader(repeats):
    """Images/s the anime64 recipe's loader delivers from 64x64 PNGs on this CPU: a bound on GPU training speed."""
    import numpy as np
    from PIL import Image
    args = train.parse_args(CONFIGS["anime64"])
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for n in range(1, 513):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(folder, f"{n}.png"))
        dataset = util.NumberedImages(folder, 64, mirror=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                             sampler=train.shuffle_forever(len(dataset), 0),
                                             num_workers=args.num_workers, drop_last=True)
        seconds = seconds_per_4_batches(loader, repeats)  # its workers stop before their folder goes
    return 4 * args.batch_size / seconds, args.num_workers


def seconds_per_4_batches(loader, repeats):
    batches = iter(loader)
    return median_seconds(lambda: [next(batches) for _ in range(4)], torch.device("cpu"), repeats)


# ----------------------------------------------------------------------------------------------------------


def machine(device):
    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"),
                python=platform.python_version())
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
            info["device"] = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                                  if line.startswith("model name"))
            flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
            info["cpu_flags"] = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
        except (OSError, StopIteration):
            info["device"] = platform.processor() or "cpu"
        info["cores"] = os.cpu_count()
    return info


def print_table(rows):
    columns = [("config", "{}"), ("precision", "{}"), ("mode", "{}"), ("batch", "{}"), ("train_img_s", "{:.1f}"),
               ("gflop_per_img", "{:.2f}"), ("mfu", "{:.1%}"), ("conv_mfu", "{:.1%}"),
               ("conv_share", "{:.0%}"), ("peak_gib", "{:.2f}"), ("compile_s", "{:.0f}"),
               ("sample_img_s", "{:.1f}"), ("grid50_s", "{:.1f}"), ("grid1000_s", "{:.0f}"), ("skipped", "{}")]
    cells = [[name for name, _ in columns]]
    for row in rows:
        line = []
        for name, fmt in columns:
            value = row.get(name)
            text = "" if value is None else fmt.format(value)
            if name == "grid1000_s" and value is not None:
                text = row["grid1000_derived"] + text
            line.append(text)
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(text.rjust(width) for text, width in zip(line, widths)))


def main():
    args = parse_args()
    if args.estimate_gpu_memory:
        return print_gpu_memory_estimates()
    device = util.pick_device(args.device)
    if device.type == "cuda":  # as train.py runs: TF32 matmuls and convs, cuDNN's autotuner
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    names = args.config.split(",") if args.config else (list(CONFIGS) if device.type == "cuda" else ["demo", "small32"])
    if args.memory_options:
        for name in names:
            bench_memory_options(name, args.batch_size, device, args.repeats)
        return
    info = machine(device)
    print(f"{info['device']}, {info.get('cores', '')} cores {' '.join(info.get('cpu_flags', []))}, "
          f"torch {info['torch']}, {info['threads']} threads, {info['date']}")
    peaks = {name: matmul_peak(device, dtype or torch.float32, args.repeats) for name, dtype in precisions(device)}
    print("matmul peak: " + ", ".join(f"{name} {flops / 1e9:.0f} GFLOP/s" for name, flops in peaks.items()))
    rows = []
    for name in names:
        flags = CONFIGS[name] + (["--batch_size", str(args.batch_size)] if args.batch_size else [])
        fitting = []
        for precision, amp_dtype in precisions(device):  # on a GPU, those that fit its free memory
            fits, needed, free = fits_on_gpu(flags, precision, device) if device.type == "cuda" else (True, 0, 0)
            if fits:
                fitting.append((precision, amp_dtype))
            else:
                rows.append(dict(config=name, precision=precision, mode="skipped",
                                 skipped=f"needs ~{needed:.1f} GiB, {free:.1f} GiB free"))
                print(f"{name} {precision}: skipped, {rows[-1]['skipped']}", file=sys.stderr)
        built = build(name, args.batch_size, device)
        config_args, model, ema, diffusion, _ = built
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params / 1e6:.2f}M parameters, {config_args.image_size}x{config_args.image_size}, "
              f"batch {config_args.batch_size}", file=sys.stderr)
        for precision, amp_dtype in fitting:
            for compiled in ([False, True] if args.compile else [False]):
                row = bench_training(name, *built, device, precision, amp_dtype, compiled, args.repeats, peaks)
                if not compiled:
                    row.update(bench_sampling(config_args, ema, diffusion, device, amp_dtype, args.repeats))
                row["params_m"] = params / 1e6
                rows.append(row)
                print(f"  {precision} {row['mode']}: {row['train_img_s']:.1f} img/s", file=sys.stderr)
        del built, model, ema, diffusion  # the next config's estimate compares with the memory free then
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    loader_img_s, workers = bench_loader(args.repeats)
    print(f"data loader, anime64 recipe (64x64 PNGs, {workers} workers): {loader_img_s:.0f} img/s on this CPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, matmul_peak_flops=peaks, rows=rows, loader_img_s=loader_img_s), f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# GPU memory, estimated on the CPU (until a GPU measures it)


def saved_for_backward(model, diffusion, x0, t, group_norm_fp32=False, dtype=torch.bfloat16):
    """(bytes per image, bytes per step) that one training forward of x0 keeps for its backward, under autocast to
    dtype (torch.float32: none): the tensors autograd saves (seen by saved-tensor hooks) and, with model.checkpointing,
    the inputs each checkpointed block keeps to run again (which the hooks do not see). Each storage is counted once;
    the weights are not counted, but the bf16 copies autocast makes of them are: per step, not per image. Works on
    real tensors and on fake ones (FakeTensorMode: shapes and dtypes, no numbers), whose storages have no address.
    group_norm_fp32: run GroupNorm in fp32, as CUDA autocast does (it is on its fp32 list); CPU autocast runs it in
    bf16. GroupNorm then saves and returns fp32, so the SiLU and scale-shift after it save fp32 too."""
    per_batch, per_step, seen = 0, 0, set()
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}  # _cdata: the storage's identity
    param_shapes = {p.shape for p in model.parameters()}

    def count(tensor):
        nonlocal per_batch, per_step
        storage = tensor.untyped_storage()
        # Views (q, k, v of one qkv; chunks; expands) keep their whole storage alive: count each storage once
        if storage._cdata not in seen | param_storages:
            seen.add(storage._cdata)
            if tensor.shape in param_shapes:  # a bf16 copy autocast made of a weight: once a step
                per_step += storage.nbytes()
            else:
                per_batch += storage.nbytes()
        return tensor

    hooks = []
    for module in model.modules():
        if group_norm_fp32 and isinstance(module, torch.nn.GroupNorm):
            hooks.append(module.register_forward_pre_hook(lambda module, args: (args[0].float(),)))
        if model.checkpointing and isinstance(module, (unet.ResBlock, unet.Attention)):
            hooks.append(module.register_forward_pre_hook(lambda module, args: [count(x) for x in args] and None))
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                diffusion.training_losses(model, x0, t)
    finally:
        for hook in hooks:
            hook.remove()
    return per_batch / x0.shape[0], per_step


ESTIMATES = {}  # (flags, precision): their estimate, kept: each takes about a second


def estimate_gpu_memory(flags, precision="bf16"):
    """{"states", "per_image", "per_step", "gib"} for train.py with these flags on a GPU, estimated on the CPU in
    about a second: the network runs on fake tensors (shapes, no numbers), as CUDA autocast would run it.
        states     bytes of the fp32 weights, their gradients, AdamW's two moments and the EMA: 5 x 4 bytes a parameter
                   (zero_grad(set_to_none=True) frees the gradients, which come back as the backward frees
                   activations: counting them all at the peak errs on the safe side)
        per_image  bytes one image keeps for the backward (bf16 and fp16 alike; fp32 a tenth more: CUDA autocast
                   runs GroupNorm, and so what follows it, in fp32 already)
        per_step   bytes of the bf16 copies of the weights autocast keeps for the backward
        gib        states + per_step + per_image x the images in memory at once (--microbatch, else --batch_size),
                   in GiB, plus 10% for the allocator, cuDNN's workspaces and gradients in flight; the CUDA context
                   (~0.5 GiB) is not counted: compare with the free memory a process sees once CUDA is started"""
    from torch._subclasses.fake_tensor import FakeTensorMode
    key = (tuple(flags), precision)
    if key in ESTIMATES:
        return ESTIMATES[key]
    args = train.parse_args(flags)
    with FakeTensorMode():
        model, diffusion = util.build_model_and_diffusion(vars(args))  # train mode: dropout on
        x0 = torch.rand(2, 3, args.image_size, args.image_size) * 2 - 1
        t = torch.randint(0, args.num_timesteps, (2,))
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        per_image, per_step = saved_for_backward(model, diffusion, x0, t, group_norm_fp32=True, dtype=dtype)
    states = 5 * 4 * sum(p.numel() for p in model.parameters())
    at_once = args.microbatch or args.batch_size
    ESTIMATES[key] = dict(states=states, per_image=per_image, per_step=per_step,
                          gib=1.1 * (states + per_step + at_once * per_image) / 2 ** 30)
    return ESTIMATES[key]


def fits_on_gpu(flags, precision, device):
    """(whether train.py with these flags fits in the GPU's free memory now, the estimate in GiB, the free GiB)."""
    needed = estimate_gpu_memory(flags, precision)["gib"]
    free = torch.cuda.mem_get_info(device)[0] / 2 ** 30
    return needed <= free, needed, free


# train.sh's recipe, and the ways to fit it on a smaller card (the README's table)
RECIPES = {"as it is": [], "--microbatch 32": ["--microbatch", "32"], "--microbatch 16": ["--microbatch", "16"],
           "--checkpointing": ["--checkpointing"], "--microbatch 32 --checkpointing": ["--microbatch", "32",
                                                                                      "--checkpointing"]}


def print_gpu_memory_estimates():
    """The table behind the README's: train.sh's recipe at batch 64 (and other batches), in GiB, estimated."""
    plain = estimate_gpu_memory(CONFIGS["anime64"])
    checkpointed = estimate_gpu_memory(CONFIGS["anime64"] + ["--checkpointing"])
    MiB, GiB = 2 ** 20, 2 ** 30
    print(f"anime64: fp32 weights + grads + AdamW (2) + EMA: {plain['states'] / GiB:.2f} GiB; bf16 weight copies: "
          f"{plain['per_step'] / GiB:.2f} GiB; saved for backward per image: {plain['per_image'] / MiB:.1f} MiB "
          f"(--checkpointing: {checkpointed['per_image'] / MiB:.1f} MiB; fp32: "
          f"{estimate_gpu_memory(CONFIGS['anime64'], 'fp32')['per_image'] / MiB:.1f} MiB)")
    print("GiB = 1.1 x (states + weight copies + images in memory at once x per image); add the CUDA context")
    print("precision  batch  flags                              GiB")
    for precision, batch, name in [("bf16", 32, "as it is"), ("bf16", 128, "as it is"), ("fp32", 64, "as it is"),
                                   *[("bf16", 64, name) for name in RECIPES]]:
        flags = CONFIGS["anime64"] + ["--batch_size", str(batch)] + RECIPES[name]
        print(f"{precision:>9}  {batch:5d}  {name:<33}  {estimate_gpu_memory(flags, precision)['gib']:5.1f}")


if __name__ == "__main__":
    main()

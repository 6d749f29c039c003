"""
The GPU check of GPU.md (issue 24): one command that runs what only a CUDA machine shows, in under 10 minutes, and
writes every log and picture under OUT, then prints a table (one row per part: status, seconds, key figure) and
writes it to OUT/summary.md.

    python tests/gpu_check.py OUT                          # on a GPU machine: every part, under 10 minutes
    python tests/gpu_check.py OUT --device cpu --quick     # the same parts, shortened or skipped, on the CPU
    python tests/gpu_check.py OUT --only attention,resume  # some parts only

Each part runs in a process of its own under a time limit (the limits on CUDA sum to under 10 minutes), so that a
crash, a hung kernel or a poisoned CUDA context stops that part only; its output goes to OUT/PART.log. The parts,
in order:
    versions       nvidia-smi, torch, the device, bf16 support -> OUT/versions.txt
    tests          python -m pytest -q tests -> OUT/pytest.txt (not under --quick: the CPU suite runs this script)
    attention      SDPA with the flash and memory-efficient kernels forced, bf16 and fp16, forward and backward,
                   against the math kernel in fp32; unet.Attention on a channels_last input
    layouts        GroupNorm's output layout for a channels_last input; train.training_step in NCHW and channels_last
    bench          tests/bench.py: anime64 and small32, --memory_options, then --compile -> OUT/*.json, bench.txt;
                   a case too large for the GPU's free memory, by bench.py's estimate, is skipped with the reason
    checkpointing  UNet gradients with and without activation checkpointing at dropout 0.1
    fp16           an injected inf gradient under GradScaler (skipped step, halved scale); train.py --precision fp16
    syncs          train.training_step under DDP, the stop check and a log row under torch.cuda.set_sync_debug_mode
                   ("warn"), in one process (CUDA only)
    resume         train.py 4 + 2 steps against 6; fp32 -> fp16; CPU -> CUDA
    sigterm        two torchrun processes with DataLoader workers, SIGTERM, then a rerun that resumes
    train_sh       the users' command: sh train.sh on the emoji at 64x64, restarted once, stopped; eval.py, sample.py
                   (on a smaller GPU with the README's flags for it: the first that fits, by bench.py's estimate)
    sample_fid     sample.py --num 2000 --batch_size 256: images/s (CUDA only)
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# A model small enough for the CPU: 16x16 images, two levels; fast steps, frequent logs, no sample grids
TINY = ["--image_size", "16", "--base_channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1",
        "--attention_resolutions", "8", "--num_heads", "2", "--num_timesteps", "50", "--batch_size", "8",
        "--num_samples", "4", "--warmup_steps", "1", "--lr", "1e-3", "--log_every", "1", "--save_every", "1000",
        "--sample_every", "0", "--num_workers", "0"]

# -----------------------------------------------------------------------------
# running commands


class Part:
    """What a part gets: the output folder, the device, --quick, and the time it has left."""

    def __init__(self, out, device, quick, seconds):
        self.out, self.device, self.quick, self.cuda = out, device, quick, device.startswith("cuda")
        self.deadline = time.monotonic() + seconds - 5  # 5 s to spare for writing the result

    def left(self):
        return max(1.0, self.deadline - time.monotonic())


GROUPS = []  # the process groups of the commands this part started: stopped with it


def start(cmd, log, env=None):
    """cmd (a list) started in the repository root in a process group of its own, output appended to log."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    GROUPS.append(proc.pid)
    return proc


def finish(proc, timeout):
    """Its exit code, or None when it ran past timeout (then it is killed, with every process it started)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        return None


def command(cmd, log, timeout, env=None):
    """(exit code or None, seconds)."""
    began = time.monotonic()
    rc = finish(start(cmd, log, env), timeout)
    return rc, time.monotonic() - began


def descendants(pid):
    """The processes pid started, those they started, and so on, from /proc (Linux)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the command's name
        except (OSError, IndexError, ValueError):
            continue  # it has exited
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid):
    """SIGKILL to the process group of pid and to those of its descendants: torchrun starts each rank in a session
    of its own, which would outlive it."""
    groups = {pid}
    for child in descendants(pid):
        try:
            groups.add(os.getpgid(child))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # every process of it has exited


def stop_groups():
    for group in GROUPS:
        kill_tree(group)


def error_line(log, pattern=r"\w+(Error|Exception)\b|^error:"):
    """The line of a log that says what went wrong: the last one that matches pattern, else the last line."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", Path(log).read_text(errors="replace")) if line.strip()]
    errors = [line for line in lines if re.search(pattern, line)]
    return ((errors or lines or ["(no output)"])[-1])[:160]


def logged_steps(out_dir):
    """The step of each row of OUT/log.csv so far."""
    path = Path(out_dir) / "log.csv"
    rows = path.read_text().splitlines()[1:] if path.exists() else []
    return [int(row.split(",")[0]) for row in rows if row.split(",")[0].isdigit()]


def emoji_folder(p, size, min_size):
    """OUT/emojiSIZE: the bundled emoji as a dataset folder, made once with util.py prepare (into a temporary folder,
    renamed when complete)."""
    folder = p.out / f"emoji{size}"
    if not folder.exists():
        tmp = p.out / f"emoji{size}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rc, _ = command([PYTHON, "util.py", "prepare", "data/emoji", "--out", tmp, "--size", size,
                         "--min_size", min_size], p.out / "prepare.log", p.left())
        if rc != 0:
            raise RuntimeError(f"util.py prepare failed: {error_line(p.out / 'prepare.log')}")
        tmp.rename(folder)
    return folder


def stat(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return " Z "  # gone between the two looks


def fresh(folder):
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# -----------------------------------------------------------------------------
# measuring, in this process


def torch_setup(p):
    import torch
    sys.path.insert(0, str(ROOT))
    import util
    device = util.pick_device(p.device)
    low = util.autocast_dtype(device, "auto") if p.cuda else None  # the rule training uses: bf16 only where native
    return torch, device, low  # low: the autocast dtype of training on this device (None: fp32 on the CPU)


def layout(t):
    import torch
    if t.is_contiguous():
        return "NCHW"
    return "channels_last" if t.is_contiguous(memory_format=torch.channels_last) else f"strides {t.stride()}"


def median_seconds(fn, device, repeats=10, warmup=3):
    import torch
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the clock is read only once the GPU has finished
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def small_unet(device, **changes):
    """A UNet as it is after some training: its zero-initialised layers (unet.zero_init) given weights, without
    which the output is 0 and every gradient but the last layer's is 0."""
    import torch
    import unet
    settings = dict(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(8,), num_heads=2, dropout=0.1)
    model = unet.UNet(**{**settings, **changes})
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and not module.weight.any():
            module.reset_parameters()
    return model.to(device)


DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "None": "fp32"}


def dtype_name(dtype):
    return DTYPE_NAMES[str(dtype)]


def relative_error(got, reference):
    return ((got.float() - reference).abs().max() / reference.abs().max()).item()


# -----------------------------------------------------------------------------
# the parts: each returns (status, key figure)


def part_versions(p):
    torch, device, _ = torch_setup(p)
    smi = shutil.which("nvidia-smi")
    lines = [subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout if smi else "nvidia-smi: none",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()})"]
    import util
    bf16 = util.native_bf16(device)  # not torch.cuda.is_bf16_supported(), which is true where it is only emulated
    if p.cuda:
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        lines.append(f"{torch.cuda.device_count()} GPU(s); {name}, compute capability "
                     f"{torch.cuda.get_device_capability(device)}, {memory:.0f} GiB")
    else:
        name = platform.processor() or "cpu"
        if Path("/proc/cpuinfo").exists():
            name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), name)
    lines.append(f"{name}; native bf16: {bf16}")
    (p.out / "versions.txt").write_text("\n".join(lines) + "\n")
    return "ok", f"torch {torch.__version__}, {name}, bf16 {'yes' if bf16 else 'no'}"


def part_tests(p):
    if p.quick:
        return "skipped", "under --quick (the CPU suite runs tests/test_gpu_check.py, which runs this script)"
    rc, seconds = command([PYTHON, "-m", "pytest", "-q", "tests"], p.out / "pytest.txt", p.left())
    summary = [line.strip("= ") for line in (p.out / "pytest.txt").read_text().splitlines() if line.strip()][-1]
    if rc is None:
        return "FAIL", f"timed out after {seconds:.0f} s, at: {summary[:100]}"
    return ("ok" if rc == 0 else "FAIL"), summary


def part_attention(p):
    torch, device, _ = torch_setup(p)
    import copy
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import unet
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full fp32
    fused = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    tolerance = {torch.bfloat16: 5e-2, torch.float16: 1e-2, None: 1e-5}  # of the max error / max |reference|

    def sdpa(q, k, v, grad, dtype, backend):  # -> output, dq, dk, dv
        q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v)
        out.backward(grad.to(dtype))
        return out, q.grad, k.grad, v.grad

    lines, failed, skipped, worst = [], [], [], {}
    # anime64's attention: 16x16 positions of 384 channels and 8x8 of 512, in 4 heads (d = 96, 128)
    for shape in [(8, 4, 256, 96), (8, 4, 64, 128)] if p.cuda else [(2, 2, 64, 32)]:
        torch.manual_seed(0)
        q, k, v, grad = (torch.randn(shape, device=device) for _ in range(4))
        reference = sdpa(q, k, v, grad, torch.float32, SDPBackend.MATH)
        for backend in (SDPBackend.MATH, *fused):
            for dtype in (torch.bfloat16, torch.float16):
                name = f"{backend.name.split('_')[0].lower()} {dtype_name(dtype)}"
                try:
                    errors = [relative_error(a, b) for a, b in zip(sdpa(q, k, v, grad, dtype, backend), reference)]
                except RuntimeError as e:  # no such kernel on this device
                    (failed if p.cuda else skipped).append(name)
                    lines.append(f"{name} {shape}: {str(e).splitlines()[0]}")
                    continue
                lines.append(f"{name} {shape}: out, dq, dk, dv " + ", ".join(f"{e:.1e}" for e in errors))
                worst[name] = max(worst.get(name, 0), *errors)
                if max(errors) > tolerance[dtype]:
                    failed.append(name)

    # unet.Attention as training runs it: channels_last weights and input, autocast, no math kernel allowed on CUDA
    torch.manual_seed(0)
    C, heads, size = (384, 4, 16) if p.cuda else (32, 2, 8)
    attention = unet.Attention(C, heads).to(device)
    attention.proj.reset_parameters()  # zero-initialised, it would make the output x and give qkv no gradient
    attention_cl = copy.deepcopy(attention).to(memory_format=torch.channels_last)
    x = torch.randn(4, C, size, size, device=device)

    def run(module, x, dtype, backends):  # -> output, input gradient, qkv weight gradient
        x = x.detach().requires_grad_()
        with sdpa_kernel(list(backends)), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                         enabled=dtype is not None):
            out = module(x)
        out.float().square().mean().backward()
        return out, x.grad, module.qkv.weight.grad

    reference = run(attention, x, None, [SDPBackend.MATH])
    dtype = torch.bfloat16 if p.cuda else None
    try:
        got = run(attention_cl, x.contiguous(memory_format=torch.channels_last), dtype,
                  fused if p.cuda else [SDPBackend.MATH, *fused])
        errors = [relative_error(a, b) for a, b in zip(got, reference)]
        lines.append(f"unet.Attention channels_last {dtype_name(dtype)}: out, dx, dW_qkv "
                     + ", ".join(f"{e:.1e}" for e in errors) + f"; output {layout(got[0])}")
        worst["unet.Attention channels_last"] = max(errors)
        if max(errors) > tolerance[dtype]:
            failed.append("unet.Attention channels_last")
    except RuntimeError as e:  # on CUDA: the layout would need the math kernel
        failed.append("unet.Attention channels_last")
        lines.append(f"unet.Attention channels_last: {str(e).splitlines()[0]}")
    (p.out / "attention.txt").write_text("\n".join(lines) + "\n")
    figure = "max rel. error vs fp32 math: " + ", ".join(f"{name} {e:.1e}" for name, e in worst.items())
    figure += "".join(f"; FAIL {', '.join(sorted(set(failed)))}" if failed else "")
    figure += f"; skipped (no kernel): {', '.join(skipped)}" if skipped else ""
    return ("FAIL" if failed else "ok"), figure


def part_layouts(p):
    torch, device, low = torch_setup(p)
    import train
    import unet
    cl = torch.channels_last
    autocast = torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None)
    norm = unet.group_norm(128).to(device)
    with torch.no_grad(), autocast:
        norm_layout = layout(norm(torch.randn(8, 128, 32, 32, device=device).contiguous(memory_format=cl)))
    # train.training_step as training runs it, on the recipe's model (a tiny one on the CPU), in each layout: CUDA's
    # GroupNorm works on NCHW, so NHWC (train.memory_format's choice on GPUs) may lose more there than convs gain
    flags = ["--image_size", "64", "--base_channels", "128", "--channel_mult", "1,2,3,4", "--num_res_blocks", "2",
             "--attention_resolutions", "16,8", "--batch_size", "32"] if p.cuda else [*TINY]
    args = train.parse_args([*flags, "--out_dir", str(fresh(p.out / "layouts"))])
    model, ema, diffusion, optimizer, scaler, _ = train.build_or_resume(args, vars(args), device, low)
    x0 = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) * 2 - 1
    seconds = {}
    for name, memory_format in (("NCHW", torch.contiguous_format), ("channels_last", cl)):
        model.to(memory_format=memory_format)
        ema.to(memory_format=memory_format)
        optimizer.state.clear()  # AdamW's moments are made again in the new layout
        images = x0.contiguous(memory_format=memory_format)
        seconds[name] = median_seconds(lambda: train.training_step(model, model, ema, diffusion, optimizer, scaler,
                                                                   images, 1000, args, low), device, repeats=5)
    nchw, nhwc = seconds["NCHW"], seconds["channels_last"]
    faster = "channels_last" if nhwc < nchw else "NCHW"
    return "ok", (f"GroupNorm of a channels_last input gives {norm_layout}; training step at "
                  f"{args.batch_size}x{args.image_size}x{args.image_size} {dtype_name(low)}: NCHW {nchw * 1e3:.2f} ms, "
                  f"channels_last {nhwc * 1e3:.2f} ms ({nhwc / nchw:.2f}x): {faster} is faster"
                  + (" (train.memory_format's choice on GPUs: channels_last)" if p.cuda else ""))


def part_bench(p):
    bench = [PYTHON, "tests/bench.py", "--device", p.device]
    if p.quick and not p.cuda:
        return "skipped", "under --quick on the CPU: bench.py's smallest config takes about a minute there"
    if p.quick:
        runs = [("demo", bench + ["--config", "demo", "--repeats", "1", "--json", p.out / "demo.json"])]
    elif p.cuda:
        runs = [("anime64", bench + ["--config", "anime64", "--repeats", "3", "--json", p.out / "anime64.json"]),
                ("small32", bench + ["--config", "small32", "--repeats", "3", "--json", p.out / "small32.json"]),
                ("memory_options", bench + ["--config", "anime64", "--memory_options", "--repeats", "2"]),
                ("compiled", bench + ["--config", "anime64", "--compile", "--repeats", "3",
                                      "--json", p.out / "anime64_compiled.json"])]  # last: minutes of compiling
    else:
        runs = [("demo,small32", bench + ["--repeats", "3", "--json", p.out / "demo_small32.json"])]
    figures, failed = [], False
    for name, cmd in runs:
        rc, seconds = command(cmd, p.out / "bench.txt", p.left())
        if rc != 0:
            outcome = "not done in the time left" if rc is None else f"FAIL: {error_line(p.out / 'bench.txt')}"
            figures.append(f"{name}: {outcome} ({seconds:.0f} s)")
            failed |= name != "compiled"  # compiling may not fit in the time limit; the eager figures are the check
            continue
        if "--json" in cmd:
            rows = json.loads(Path(cmd[-1]).read_text())["rows"]
            figures += [f"{row['config']} {row['precision']} skipped: {row['skipped']}" for row in rows
                        if "skipped" in row]  # too large for the GPU's free memory, by tests/bench.py's estimate
            measured = [row for row in rows if "skipped" not in row]
            for config in dict.fromkeys(row["config"] for row in measured):
                best = max((row for row in measured if row["config"] == config), key=lambda row: row["train_img_s"])
                figures.append(f"{config} {best['precision']} {best['mode']} {best['train_img_s']:.0f} img/s, "
                               f"MFU {best['mfu']:.0%}, {best['peak_gib']:.1f} GiB")
        else:
            figures.append(f"{name}: see bench.txt")
    return ("FAIL" if failed else "ok"), "; ".join(figures)


def part_checkpointing(p):
    torch, device, low = torch_setup(p)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # so that only checkpoint differs
    torch.manual_seed(0)
    model = small_unet(device).to(memory_format=torch.channels_last).train()
    x, t = torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 1000, (8,), device=device)

    def gradients(checkpointing, seed, dtype):
        model.checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)  # the same dropout masks, if checkpoint() restores the random state as it should
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x, t)
        out.float().square().mean().backward()
        return [param.grad.float() for param in model.parameters()]

    def max_difference(a, b):
        return max((u - v).abs().max().item() for u, v in zip(a, b))

    figures, ok = [], True
    for dtype in [None, low] if low else [None]:
        plain = gradients(False, 0, dtype)
        difference = max_difference(gradients(True, 0, dtype), plain)
        noise = max_difference(gradients(False, 0, dtype), plain)  # CUDA's attention backward may use atomics
        other_masks = max_difference(gradients(False, 1, dtype), plain)  # dropout is on: other masks, other gradients
        ok &= difference <= max(1e-5, 4 * noise) and other_masks > 10 * difference
        figures.append(f"{dtype_name(dtype)}: max grad difference {difference:.1e} (the same run twice: {noise:.1e}; "
                       f"another seed's dropout: {other_masks:.1e})")
    return ("ok" if ok else "FAIL"), "; ".join(figures)


def part_fp16(p):
    torch, device, _ = torch_setup(p)
    weight = torch.nn.Parameter(torch.ones(8, device=device))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)  # as train.py builds it
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0)

    def step(factor):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale((weight * factor).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale()

    scale = step(float("inf"))  # an overflow: every gradient is inf
    skipped = bool((weight == 1).all())
    step(1.0)
    applied = not bool((weight == 1).all())
    ok = skipped and scale == 512 and applied
    figure = (f"injected inf: step skipped {'yes' if skipped else 'NO'}, scale 1024 -> {scale:g}, next step applied "
              f"{'yes' if applied else 'NO'}; train.py --precision fp16, 3 steps: ")
    if p.quick and not p.cuda:  # the CPU's fp16 convolution backward takes seconds a step even here
        return ("ok" if ok else "FAIL"), figure + "skipped under --quick on the CPU"
    folder = fresh(p.out / "fp16")
    rc, _ = command([PYTHON, "train.py", "--data_dir", emoji_folder(p, 16, 16), "--out_dir", folder, *TINY,
                     "--max_steps", "3", "--precision", "fp16", "--device", p.device], p.out / "fp16_train.log",
                    p.left())
    log = (folder / "log.csv").read_text().splitlines() if (folder / "log.csv").exists() else []
    scales = [row.split(",")[-1] for row in log[1:]]
    ok &= rc == 0 and len(scales) == 3
    return ("ok" if ok else "FAIL"), figure + f"exit {rc}, loss scales {' '.join(scales)}" + (
        "" if rc == 0 else f" ({error_line(p.out / 'fp16_train.log')})")


def part_syncs(p):
    if not p.cuda:
        return "skipped", "CUDA only"
    torch, device, low = torch_setup(p)
    import warnings
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    import train
    flags = ["--base_channels", "64", "--attention_resolutions", "16,8", "--batch_size", "16", "--log_every", "1000"]
    args = train.parse_args([*flags, "--out_dir", str(fresh(p.out / "syncs"))])

    def syncs(fn, calls=3):  # the sync warnings of `calls` calls of fn, after one to warm up (cuDNN, the allocator)
        fn()
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(calls):
                    fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]

    counts, lines = {}, []
    for dtype in dict.fromkeys([low, torch.float16]):  # what train.py runs: its step under DDP, its log, its stop check
        model, ema, diffusion, optimizer, scaler, _ = train.build_or_resume(args, vars(args), device, dtype)
        if not dist.is_initialized():  # one process, as one rank of several: DDP's own paths run
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        ddp = DistributedDataParallel(model, device_ids=[device])
        x0 = torch.rand(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=train.memory_format(device))
        log = train.Log(args, 0, limit=100, write=False)

        def step():
            log.add(*train.training_step(ddp, model, ema, diffusion, optimizer, scaler, x0, 100, args, dtype))

        def stop_check():
            train.ranks_agree_to_stop(False, device)

        def log_row():
            step()
            log.row(1, args.lr, args.batch_size, scaler, "none")

        for name, fn, calls in (("steps", step, 3), ("stop check", stop_check, 1), ("log row", log_row, 1)):
            found = syncs(fn, calls)
            counts[f"{dtype_name(dtype)} {name}"] = len(found)
            lines += [f"{dtype_name(dtype)} {name}: {line}" for line in found]
    dist.destroy_process_group()
    (p.out / "syncs.txt").write_text("\n".join(lines) + "\n")
    # expected: none in the steps; one in the stop check (its result, read once) and one in a log row (its numbers)
    ok = all(count == (0 if name.endswith("steps") else 1) for name, count in counts.items())
    return ("ok" if ok else "FAIL"), "sync warnings (expected 0 in 3 steps, 1 in a stop check, 1 in a log row): " + \
        ", ".join(f"{name} {count}" for name, count in counts.items()) + ("" if not lines else f"; {lines[0][:100]}")


def part_resume(p):
    torch, _, _ = torch_setup(p)
    import util
    data, folder = emoji_folder(p, 16, 16), fresh(p.out / "resume")
    fp32 = ["--precision", "fp32"]
    chains = {  # name: the train.py runs, one after another, in one --out_dir
        "4+2": [["--max_steps", "4", *fp32], ["--max_steps", "6", *fp32]],
        "6": [["--max_steps", "6", *fp32]],
        "fp32 -> fp16": [["--max_steps", "4", *fp32], ["--max_steps", "6", "--precision", "fp16"]],
    }
    if p.cuda:
        chains["cpu -> cuda"] = [["--max_steps", "4", "--device", "cpu"], ["--max_steps", "6", "--device", p.device]]

    def run_chain(name):
        out = folder / re.sub(r"\W+", "_", name)  # resume/4_2, resume/fp32_fp16, ...
        log = out.with_suffix(".log")
        for i, flags in enumerate(chains[name]):
            rc, _ = command([PYTHON, "train.py", "--data_dir", data, "--out_dir", out, *TINY, "--device", p.device,
                             *flags], log, p.left())
            if rc != 0:
                return f"FAIL (exit {rc}: {error_line(log)[:90]})"
            if i == 0:
                shutil.copy(out / "ckpt.pt", out / "ckpt_first.pt")
        step = util.load_checkpoint(out / "ckpt.pt")["step"]
        return "ok" if step == 6 else f"FAIL (ended at step {step})"

    with ThreadPoolExecutor(len(chains)) as pool:  # the chains at once: each is mostly start-up
        results = dict(zip(chains, pool.map(run_chain, chains)))
    figures = []
    if results["4+2"] == results["6"] == "ok":
        weights = {name: util.load_checkpoint(folder / path)["model"]
                   for name, path in (("4+2", "4_2/ckpt.pt"), ("6", "6/ckpt.pt"), ("4", "4_2/ckpt_first.pt"))}

        def max_difference(a, b):
            return max((weights[a][key].float() - weights[b][key].float()).abs().max().item() for key in weights[a])

        difference, moved = max_difference("4+2", "6"), max_difference("6", "4")
        results["4+2"] = "ok" if difference <= max(1e-6, 0.01 * moved) else "FAIL"
        figures.append(f"4+2 vs 6 steps: {results['4+2']}, max weight difference {difference:.1e} (2 steps move "
                       f"them {moved:.1e})")
    else:
        figures.append(f"4+2 vs 6 steps: {results['4+2'] if results['4+2'] != 'ok' else results['6']}")
    figures += [f"{name}: {result}" for name, result in results.items() if name not in ("4+2", "6")]
    failed = any(result != "ok" for result in results.values())
    return ("FAIL" if failed else "ok"), "; ".join(figures)


def part_sigterm(p):
    torch, _, _ = torch_setup(p)
    import util
    data, folder = emoji_folder(p, 16, 16), fresh(p.out / "sigterm")
    two_gpus = p.cuda and torch.cuda.device_count() >= 2
    device = [] if two_gpus else ["--device", "cpu"]  # auto: each rank on cuda:LOCAL_RANK; else gloo on the CPU
    run = folder / "run"

    def torchrun(max_steps, log):
        return start([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                      "--data_dir", data, "--out_dir", run, *TINY, "--num_workers", "2", "--max_steps", max_steps,
                      *device], folder / log)

    proc = torchrun(100000, "first.log")
    until = time.monotonic() + min(90, p.left() - 45)
    while proc.poll() is None and time.monotonic() < until and len(logged_steps(run)) < 3:
        time.sleep(0.5)  # training runs once log.csv has rows
    if proc.poll() is not None or not logged_steps(run):
        finish(proc, 1)
        return "FAIL", f"torchrun did not start training: {error_line(folder / 'first.log')}"
    proc.send_signal(signal.SIGTERM)
    rc = finish(proc, min(60, p.left() - 30))
    reached = logged_steps(run)[-1]
    where = f"{'2 GPUs' if two_gpus else '2 CPU processes'}, SIGTERM at step {reached}, torchrun exit {rc}"
    if not (run / "ckpt.pt").exists():
        return "FAIL", f"{where}: no ckpt.pt written ({error_line(folder / 'first.log', r'^.rank.*Error')})"
    saved = util.load_checkpoint(run / "ckpt.pt")["step"]
    if "forcefully exiting via 9" in (folder / "first.log").read_text():
        where += " (a rank did not stop within torchrun's 30 s grace: SIGKILL)"
    rerun = finish(torchrun(saved + 2, "rerun.log"), min(90, p.left()))
    resumed = f"resuming at step {saved}" in (folder / "rerun.log").read_text()
    ok = saved == reached and resumed and rerun == 0
    return ("ok" if ok else "FAIL"), (f"{where}: ckpt.pt at step {saved}; the rerun "
                                      f"{'resumed' if resumed else 'did NOT resume'} from it and "
                                      f"{'timed out' if rerun is None else f'exited {rerun}'}")


def part_train_sh(p):
    data, folder = emoji_folder(p, 64, 32), p.out / "anime64"
    shutil.rmtree(folder, ignore_errors=True)
    flags = ["--data_dir", data, "--out_dir", folder]
    if p.cuda:  # train.sh's recipe and model, with the README's flags for a smaller card if its memory needs them
        torch, device, low = torch_setup(p)
        sys.path.insert(0, str(ROOT / "tests"))
        import bench
        estimates = {name: bench.fits_on_gpu(bench.CONFIGS["anime64"] + options, dtype_name(low), device)
                     for name, options in bench.RECIPES.items()}
        fitting = [name for name, (fits, _, _) in estimates.items() if fits]
        if not fitting:
            name = list(bench.RECIPES)[-1]  # the smallest
            _, needed, free = estimates[name]
            return "skipped", f"train.sh's recipe with {name} needs ~{needed:.1f} GiB, {free:.1f} GiB free"
        recipe = f"the recipe {fitting[0]}"
        flags += [*bench.RECIPES[fitting[0]], "--log_every", "50", "--sample_every", "500"]
        first, second = 30, 15  # seconds of training before the restart and after it
    else:  # the recipe's 92M-parameter model would not take a step in time: a tiny one
        recipe = "a tiny model on the CPU"
        flags += [*TINY, "--device", "cpu", "--log_every", "10", "--sample_every", "50", "--num_samples", "16"]
        first, second = (8, 4) if p.quick else (60, 30)
    env = {**os.environ, "PYTHON": PYTHON}
    log, train_log = p.out / "train_sh.txt", folder / "train.log"
    for wait in (first, second):  # the second run stops the first (it saves) and resumes
        rc, _ = command(["sh", "train.sh", *flags], log, min(200, p.left()), env)
        if rc != 0:
            return "FAIL", f"sh train.sh: exit {rc}: {error_line(log)}"
        time.sleep(min(wait, p.left() - 60))
    pid = int((folder / "train.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    until = time.monotonic() + 60
    # it is not our child (train.sh started it in the background): wait until it is gone, or a zombie
    while time.monotonic() < until and Path(f"/proc/{pid}").exists() and " Z " not in stat(pid):
        time.sleep(0.5)
    text = train_log.read_text()
    resumed = re.findall(r"resuming at step (\d+)", text)
    stopped = re.findall(r"stopped at step (\d+) \((\w+) received\)", text)
    rc_eval, eval_s = command([PYTHON, "eval.py", folder / "ckpt.pt", "--steps", "50", "--out", p.out / "eval"],
                              p.out / "eval.txt", p.left())
    rc_sample, sample_s = command([PYTHON, "sample.py", folder / "ckpt.pt", "--num", "256", "--batch_size", "256",
                                   "--steps", "50", "--out", p.out / "samples"], p.out / "sample.txt", p.left())
    pictures = fresh(p.out / "pictures")
    grids = sorted((folder / "samples").glob("*.png"))
    for source, name in ((folder / "log.csv", "log.csv"), (folder / "loss.png", "loss.png"),
                         (grids[-1] if grids else folder / "none", "last_samples.png"),
                         (p.out / "eval" / "grid.png", "eval_grid.png"), (p.out / "eval" / "steps.png", "steps.png")):
        if source.exists():
            shutil.copy(source, pictures / name)
    rows = (folder / "log.csv").read_text().splitlines() if (folder / "log.csv").exists() else []
    img_s = rows[-1].split(",")[6] if len(rows) > 1 else "?"
    ok = bool(resumed and stopped) and rc_eval == 0 and rc_sample == 0 and len(os.listdir(pictures)) == 5
    return ("ok" if ok else "FAIL"), (
        f"{recipe}: resumed at step {resumed[-1] if resumed else 'NOT'}, "
        f"stopped at {stopped[-1][0] if stopped else 'NOT'}; "
        f"{img_s} train img/s; eval.py --steps 50: exit {rc_eval}, {eval_s:.0f} s; sample.py 256 x 50 steps: exit "
        f"{rc_sample}, {sample_s:.0f} s = {256 / sample_s:.1f} img/s (with start-up); pictures/: "
        f"{len(os.listdir(pictures))} of 5")


def part_sample_fid(p):
    if not p.cuda or p.quick:
        return "skipped", "CUDA only, not under --quick"
    checkpoint, log = p.out / "anime64" / "ckpt.pt", p.out / "sample_fid.txt"
    if not checkpoint.exists():
        return "skipped", "no OUT/anime64/ckpt.pt to sample from: the train_sh part made none"
    rc, seconds = command([PYTHON, "sample.py", checkpoint, "--num", "2000", "--batch_size", "256",
                           "--out", p.out / "fid_samples"], log, p.left())
    shutil.rmtree(p.out / "fid_samples", ignore_errors=True)  # 2000 PNGs: a measure of speed, not pictures to keep
    if rc == 0:
        return "ok", f"2000 images in {seconds:.0f} s: {2000 / seconds:.1f} img/s (with start-up)"
    rates = re.findall(r"(\d+)/(\d+) \[[^\]]*?([\d.]+)(it/s|s/it)\]", log.read_text())  # tqdm's, per step
    if rc is None and rates:
        _, steps, rate, unit = rates[-1]
        steps_per_s = float(rate) if unit == "it/s" else 1 / float(rate)
        return "ok", (f"{steps_per_s:.1f} steps/s at batch 256: {256 * steps_per_s / int(steps):.1f} img/s at "
                      f"{steps} steps (the step rate; stopped at the {seconds:.0f} s limit)")
    return "FAIL", f"exit {rc}: {error_line(log)}"


PARTS = [  # name, function, time limit in seconds on CUDA (together under 10 minutes), on the CPU
    ("versions", part_versions, 15, 60),
    ("tests", part_tests, 95, 3600),
    ("attention", part_attention, 20, 120),
    ("layouts", part_layouts, 30, 120),
    ("bench", part_bench, 125, 900),
    ("checkpointing", part_checkpointing, 15, 120),
    ("fp16", part_fp16, 30, 180),
    ("syncs", part_syncs, 25, 60),
    ("resume", part_resume, 45, 600),
    ("sigterm", part_sigterm, 50, 300),
    ("train_sh", part_train_sh, 120, 600),
    ("sample_fid", part_sample_fid, 25, 60),
]

# -----------------------------------------------------------------------------


def run_part(name, args, limit):
    """Runs this script again for one part, with its time limit; (status, figure)."""
    result = args.out / "parts" / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [PYTHON, Path(__file__).resolve(), args.out, "--device", args.device, "--part", name, "--seconds", limit]
    if args.quick:
        cmd.append("--quick")
    with open(args.out / f"{name}.log", "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=limit)
    except (subprocess.TimeoutExpired, KeyboardInterrupt) as stop:
        proc.terminate()  # it stops the commands it started, then exits
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if isinstance(stop, KeyboardInterrupt):
            raise
        return "FAIL", f"timed out after {limit} s; see {name}.log"
    if result.exists():
        found = json.loads(result.read_text())
        return found["status"], found["figure"]
    return "FAIL", f"exit {proc.returncode}: {error_line(args.out / f'{name}.log')}"


def part_process(args):
    """This process is one part: it runs it and writes OUT/parts/NAME.json."""
    def stop(signum, frame):
        stop_groups()
        os._exit(124)

    signal.signal(signal.SIGTERM, stop)
    function = dict((name, function) for name, function, _, _ in PARTS)[args.part]
    try:
        status, figure = function(Part(args.out, args.device, args.quick, args.seconds))
    except Exception as error:  # a failure of the check itself: this part fails, the others run
        import traceback
        traceback.print_exc()
        status, figure = "FAIL", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    finally:
        stop_groups()  # what is still running (train.sh's background run after a failure)
    result = args.out / "parts" / f"{args.part}.json"
    result.with_suffix(".tmp").write_text(json.dumps(dict(status=status, figure=figure)))
    result.with_suffix(".tmp").replace(result)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=lambda path: Path(path).resolve(), help="folder for every log, picture and summary.md")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda:0 if there is one, else cpu)")
    p.add_argument("--quick", action="store_true", help="shorter parts; the test suite and FID sampling skipped")
    p.add_argument("--only", default=None, help=f"comma-separated parts, from: {', '.join(n for n, *_ in PARTS)}")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # this process runs that part (run_part)
    p.add_argument("--seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    if args.part:
        return part_process(args)
    if args.device is None:  # train.py's rule: the GPU, with its index, if there is one
        sys.path.insert(0, str(ROOT))
        import util
        args.device = str(util.pick_device("auto"))
    wanted = args.only.split(",") if args.only else [name for name, *_ in PARTS]
    unknown = set(wanted) - {name for name, *_ in PARTS}
    if unknown:
        p.error(f"unknown parts {', '.join(sorted(unknown))}; choose from {', '.join(n for n, *_ in PARTS)}")
    began, rows = time.monotonic(), []
    for name, _, cuda_limit, cpu_limit in PARTS:
        if name in wanted:
            part_began = time.monotonic()
            status, figure = run_part(name, args, cuda_limit if args.device.startswith("cuda") else cpu_limit)
            rows.append((name, status, time.monotonic() - part_began, figure.replace("|", "/").replace("\n", " ")))
            print(f"{name}: {status}, {rows[-1][2]:.0f} s: {figure}", flush=True)
    lines = [f"# GPU check: {time.strftime('%Y-%m-%d %H:%M')}, --device {args.device}{', --quick' * args.quick}, "
             f"{time.monotonic() - began:.0f} s in all", "",
             "| part | status | seconds | key figure |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {figure} |" for name, status, seconds, figure in rows]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 1 if any(status == "FAIL" for _, status, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""
Benchmarks, not tests: pytest does not collect this file. Run one section by name, e.g.

    python tests/bench.py unet

Each section is a function bench_NAME below; they print numbers rather than assert them.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for its modules

import torch


def bench_unet(batch_size=16, steps=5):
    from unet import UNet

    n_params = lambda model: sum(p.numel() for p in model.parameters())
    print(f"UNet() (64x64, base 128, mult 1,2,3,4): {n_params(UNet()):,} parameters")
    # the 32x32 (CIFAR-10) config of Improved DDPM, at a width that trains on a CPU
    model = UNet(image_size=32, base_channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attention_resolutions=(16, 8))
    print(f"UNet 32x32 (base 64, mult 1,2,2,2): {n_params(model):,} parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 1000, (batch_size,))
    target = torch.randn(batch_size, 6, 32, 32)

    def train_step():
        loss = (model(x, t) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, thread pool
        train_step()
    start = time.perf_counter()
    for _ in range(steps):
        train_step()
    seconds = time.perf_counter() - start
    print(f"train step (fwd + bwd + AdamW), batch {batch_size}, 32x32, {torch.get_num_threads()} threads: "
          f"{batch_size * steps / seconds:.1f} images/s")

    # torch.compile must take the whole forward as one graph; on 2 CPU cores a cold compile takes ~2 minutes
    model.eval()
    with torch.no_grad():
        eager = model(x, t)
        start = time.perf_counter()
        compiled = torch.compile(model, fullgraph=True)(x, t)
        print(f"torch.compile(fullgraph=True) forward: compiled in {time.perf_counter() - start:.0f} s, max |compiled"
              f" - eager| = {(compiled - eager).abs().max():.2e} (eager max |out| {eager.abs().max():.2f})")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[f"bench_{name}"]()

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


def bench_memory(batch_size=2):
    """GPU memory to train train.sh's 64x64 config (AdamW, EMA, bf16 autocast), estimated on the CPU."""
    from diffusion import GaussianDiffusion
    from unet import UNet

    torch.manual_seed(0)
    model = UNet(image_size=64, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attention_resolutions=(16, 8), num_heads=4, dropout=0.1, learn_sigma=True)  # train mode: dropout on
    diffusion = GaussianDiffusion(1000, "cosine", learn_sigma=True, loss_type="hybrid")
    n_params = sum(p.numel() for p in model.parameters())
    # fp32 params + grads + AdamW exp_avg and exp_avg_sq + the EMA copy. zero_grad(set_to_none=True) frees the grads,
    # which only come back as backward frees activations: counting all of them at the peak errs on the safe side.
    states = 5 * 4 * n_params
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {p.shape for p in model.parameters()}
    x0, t = torch.rand(batch_size, 3, 64, 64) * 2 - 1, torch.randint(0, 1000, (batch_size,))

    def saved_bytes(gn_fp32=True):
        """(bytes per image, bytes per step) of the tensors one training forward keeps for backward."""
        per_batch, per_step, seen = 0, 0, set()

        def pack(tensor):
            nonlocal per_batch, per_step
            storage = tensor.untyped_storage()
            # Views (q, k, v of one qkv; chunks; expands) keep their whole storage alive: count each storage once.
            # Parameters are already in `states`.
            if storage.data_ptr() not in seen | param_storages:
                seen.add(storage.data_ptr())
                if tensor.shape in param_shapes:  # a bf16 copy autocast made of a weight (CUDA's too): once a step
                    per_step += storage.nbytes()
                else:
                    per_batch += storage.nbytes()
            return tensor

        # CUDA autocast runs group_norm in fp32 (it is on its fp32 list); CPU autocast runs it in bf16 after a conv.
        # Casting its input to fp32 does what CUDA does: GroupNorm then saves fp32 and returns fp32, so the SiLU and
        # scale-shift after it save fp32 too. Convs, linears and attention go to bf16 on both; the loss is fp32.
        hooks = [m.register_forward_pre_hook(lambda m, args: (args[0].float(),))
                 for m in model.modules() if gn_fp32 and isinstance(m, torch.nn.GroupNorm)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    diffusion.training_losses(model, x0, t)
        finally:
            for hook in hooks:
                hook.remove()
        return per_batch / batch_size, per_step

    # Attention runs a fused kernel (CPU flash here, flash or memory-efficient on CUDA): it keeps q, k, v, the
    # output and a logsumexp, never the (heads, HW, HW) attention weights.
    per_image, per_step = saved_bytes()
    per_image_cpu, _ = saved_bytes(gn_fp32=False)
    MiB, GiB = 2 ** 20, 2 ** 30
    print(f"parameters: {n_params:,}; fp32 params + grads + AdamW (2) + EMA: {states / GiB:.2f} GiB; "
          f"bf16 weight copies saved for backward: {per_step / GiB:.2f} GiB")
    print(f"saved for backward per image: {per_image / MiB:.1f} MiB ({per_image:,.0f} bytes), as CUDA would run it")
    print(f"  (as CPU autocast runs it, with bf16 group_norm: {per_image_cpu / MiB:.1f} MiB)")
    # Not counted: the CUDA context (~0.5 GiB, outside PyTorch's allocator), cuDNN workspaces, gradients of
    # activations in flight during backward, fragmentation: allow ~10% on top rather than guess them.
    print("batch   GiB = states + weight copies + batch x per image (+~10% allocator, workspace, context)")
    for batch in (16, 32, 64, 128):
        print(f"{batch:5d}   {(states + per_step + batch * per_image) / GiB:5.1f}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        globals()[f"bench_{name}"]()

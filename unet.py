"""
The noise-prediction network: the U-Net of DDPM (Ho et al. 2020, App. B) with the changes of Improved DDPM
(Nichol & Dhariwal 2021, App. A): 4 attention heads, attention at 16x16 and 8x8, the timestep injected by
scale-shift, and an output of 2*in_channels when the variance is learned (eps, then v of eq. 15).

Default configuration, UNet() for 64x64 images, as print(UNet()) lists it. The encoder pushes input_conv's
output and every entry's output as a skip; each decoder entry first concatenates the last skip pushed, so its
ResBlock takes h's channels + the skip's (decoder 0: 512 + 512 from encoder 10). Attention has 4 heads.

    64x64   input_conv 3 -> 128
            encoder 0-1   ResBlock(128 -> 128), ResBlock(128 -> 128)
            encoder 2     Downsample(128)
    32x32   encoder 3-4   ResBlock(128 -> 256), ResBlock(256 -> 256)
            encoder 5     Downsample(256)
    16x16   encoder 6-7   ResBlock(256 -> 384) + Attention, ResBlock(384 -> 384) + Attention
            encoder 8     Downsample(384)
     8x8    encoder 9-10  ResBlock(384 -> 512) + Attention, ResBlock(512 -> 512) + Attention
     8x8    middle        ResBlock(512 -> 512) + Attention + ResBlock(512 -> 512)
     8x8    decoder 0-2   ResBlock(512+512, 512+512, 512+384 -> 512) + Attention, then Upsample(512)
    16x16   decoder 3-5   ResBlock(512+384, 384+384, 384+256 -> 384) + Attention, then Upsample(384)
    32x32   decoder 6-8   ResBlock(384+256, 256+256, 256+128 -> 256), then Upsample(256)
    64x64   decoder 9-11  ResBlock(256+128, 128+128, 128+128 -> 128)
    64x64   out           GroupNorm, SiLU, Conv2d(128 -> 6): eps and v for the 3 colour channels
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def group_norm(channels, min_group_channels=4):
    """GroupNorm with DDPM's 32 groups, halved until each group holds at least min_group_channels channels.
    Why a minimum: a group of one channel is instance normalisation, which removes every feature map's mean over the
    image, and after the first conv that mean is the image's global colour (style transfer uses instance norm to
    erase exactly that). DDPM's rule, math.gcd(32, channels), gives groups of one at the CPU demo's 32 channels, and
    its samples come out in colours no training image has. The paper's models (128 channels and up) have at least 4
    channels a group, so 4 keeps them exactly as they were; min_group_channels=1 is DDPM's rule."""
    groups = math.gcd(32, channels)  # a power of two that divides channels, so every halving divides it too
    while groups > 1 and channels // groups < min_group_channels:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def zero_init(module):
    # as in the released code of DDPM and Improved DDPM: a residual branch that starts at zero makes its block start
    # as the identity, and the network's output starts at zero
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def timestep_embedding(t, dim, max_period=10000):
    """Transformer sinusoidal embedding of integer timesteps (DDPM App. B): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class Dropout(nn.Dropout):
    """nn.Dropout, with a cheaper mask on the CPU. The CPU's random generator is serial and costs ~8 ns a number, so
    dropout's mask alone was 5% of a CPU training step; one 64-bit draw cut into four 16-bit integers costs a quarter
    of that. Zeroes each element with probability p (rounded to a multiple of 1/65536) and scales the rest by
    1/(1-p), as nn.Dropout does. On GPUs nn.Dropout's own fused kernel runs instead, and so it does under
    torch.compile, which makes its own random numbers (and cannot trace random_)."""

    def forward(self, x):
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        n = x.numel()
        # from -2**63: all 64 bits uniform (plain random_() keeps int64's sign bit 0, and one 16-bit lane in four >= 0)
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)
        bits = bits.view(torch.int16)[:n].view(x.shape)  # n integers uniform on [-32768, 32767]
        keep = bits >= round(self.p * 65536) - 32768  # True with probability 1 - p
        return x * keep * (1 / (1 - self.p))


class ResBlock(nn.Module):
    """Two 3x3 convs; the timestep enters between them as GroupNorm(h)*(1+scale)+shift (Improved DDPM App. A)."""

    def __init__(self, in_channels, out_channels, emb_channels, dropout, min_group_channels=4):
        super().__init__()
        self.norm1 = group_norm(in_channels, min_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)  # one scale and one shift per channel
        self.norm2 = group_norm(out_channels, min_group_channels)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv matches the channels of the skip path when the block changes them
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h

    def __repr__(self):
        return f"ResBlock({self.conv1.in_channels} -> {self.conv1.out_channels})"


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions, so distant pixels can talk (DDPM App. B)."""

    def __init__(self, channels, num_heads, min_group_channels=4):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, min_group_channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)  # a 1x1 conv is a per-position linear layer
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W), channels ordered [q heads, k heads, v heads]
        # Channels last in memory, so that each head's d channels are contiguous: the fused SDPA kernels (flash,
        # memory-efficient) need that and fall back to the slow math kernel otherwise. No copy under channels_last.
        qkv = qkv.contiguous(memory_format=torch.channels_last)
        qkv = qkv.flatten(2).transpose(1, 2).reshape(B, H * W, 3 * self.num_heads, C // self.num_heads)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=1)  # (B, heads, HW, d) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, (B, heads, HW, d)
        h = h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), stored channels last
        return x + self.proj(h)

    def __repr__(self):
        return f"Attention({self.proj.in_channels}, heads={self.num_heads})"


class Downsample(nn.Module):
    """Halve H and W with a learned stride-2 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, H/2, W/2)

    def __repr__(self):
        return f"Downsample({self.conv.in_channels})"


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour copying, then a conv to smooth the blocky result."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)

    def __repr__(self):
        return f"Upsample({self.conv.in_channels})"


class EmbedSequential(nn.Sequential):
    """One encoder/decoder entry, e.g. ResBlock + Attention; only the ResBlocks need the embedding.
    checkpointing: keep only each ResBlock's and Attention's input for the backward and run the block again there
    (activation checkpointing: less memory for about a third more compute). checkpoint() restores the random state
    before running a block again, so dropout draws the same mask in both passes."""

    def forward(self, h, emb, checkpointing=False):
        for layer in self:
            inputs = (h, emb) if isinstance(layer, ResBlock) else (h,)
            if checkpointing and isinstance(layer, (ResBlock, Attention)):
                h = torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False)
            else:
                h = layer(*inputs)
        return h

    def __repr__(self):
        return " + ".join(repr(layer) for layer in self)


class UNet(nn.Module):
    """x (B, in_channels, H, W), t (B,) int64 timesteps, y (B,) int64 labels iff num_classes is set (0 ...
    num_classes - 1, or num_classes for "no class": the null label of classifier-free guidance), low_res
    (B, cond_channels, H, W) iff cond_channels > 0 (super-resolution: the low-resolution image, upsampled to H x W)
    -> (B, 2*in_channels, H, W) = [eps, v] if learn_sigma else eps (B, in_channels, H, W).
    attention_resolutions are feature-map sizes in pixels (16: where the map is 16x16 when the input is
    image_size x image_size); image_size matters only for that. min_group_channels: see group_norm;
    checkpointing: see EmbedSequential."""

    def __init__(self, image_size=64, in_channels=3, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attention_resolutions=(16, 8), num_heads=4, dropout=0.1, learn_sigma=True, num_classes=None,
                 cond_channels=0, min_group_channels=4, checkpointing=False):
        super().__init__()
        self.in_channels, self.num_classes, self.cond_channels = in_channels, num_classes, cond_channels
        self.checkpointing = checkpointing  # a memory/compute trade of training only: see EmbedSequential
        emb_channels = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        # one more embedding than classes: the null label, which train.py puts in place of a dropped label
        self.label_embed = nn.Embedding(num_classes + 1, emb_channels) if num_classes is not None else None

        # encoder: per level, num_res_blocks ResBlocks, then halve the resolution (except at the last level)
        # super-resolution: the condition enters as extra input channels beside x_t (the reference code's upsampler)
        self.input_conv = nn.Conv2d(in_channels + cond_channels, base_channels, 3, padding=1)
        skip_channels = [base_channels]  # channels of every skip the encoder pushes, for the decoder to pop
        ch, resolution = base_channels, image_size
        encoder = []
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, base_channels * mult, emb_channels, dropout, min_group_channels)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(Attention(ch, num_heads, min_group_channels))
                encoder.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                encoder.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2
        self.encoder = nn.Sequential(*encoder)

        self.middle = EmbedSequential(
            ResBlock(ch, ch, emb_channels, dropout, min_group_channels), Attention(ch, num_heads, min_group_channels),
            ResBlock(ch, ch, emb_channels, dropout, min_group_channels))

        # decoder: mirror image, with one extra ResBlock per level to consume the skip of the Downsample / input conv
        decoder = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), base_channels * mult, emb_channels, dropout,
                                   min_group_channels)]
                ch = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(Attention(ch, num_heads, min_group_channels))
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                decoder.append(EmbedSequential(*layers))
        self.decoder = nn.Sequential(*decoder)

        # learn_sigma: the extra in_channels outputs are v, which interpolates the log-variance (eq. 15)
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.out = nn.Sequential(group_norm(ch, min_group_channels), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x, t, y=None, low_res=None):
        assert (y is not None) == (self.num_classes is not None), "pass y exactly when the model is class-conditional"
        assert (low_res is not None) == (self.cond_channels > 0), "pass low_res exactly when cond_channels > 0"
        # the embedding is computed once here and shared by every ResBlock
        emb = self.time_embed(timestep_embedding(t, self.input_conv.out_channels))  # (B, 4*base)
        if y is not None:
            emb = emb + self.label_embed(y)
        emb = F.silu(emb)  # every ResBlock's emb_proj starts with this SiLU in the paper's code; do it once

        if low_res is not None:
            x = torch.cat([x, low_res], dim=1)  # (B, in_channels + cond_channels, H, W): x_t and its condition
        checkpointing = self.checkpointing and torch.is_grad_enabled()  # sampling keeps nothing for a backward
        h = self.input_conv(x)  # (B, base, H, W)
        skips = [h]
        for block in self.encoder:
            h = block(h, emb, checkpointing)
            skips.append(h)
        h = self.middle(h, emb, checkpointing)  # (B, base*channel_mult[-1], H/2^(levels-1), W/2^(levels-1))
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, checkpointing)
        return self.out(h)  # (B, out_channels, H, W)

"""
The noise-prediction network: the U-Net of DDPM (Ho et al. 2020, App. B) with the changes of Improved DDPM
(Nichol & Dhariwal 2021, App. A): 4 attention heads, attention at 16x16 and 8x8, the timestep injected by
scale-shift, and an output of 2*in_channels when the variance is learned (eps, then the variance output).

The default configuration, UNet() for 64x64 images. The encoder pushes input_conv's output and every entry's output
as a skip, which each decoder entry concatenates to h first (decoder 0: 512 + 512 from encoder 10).

    64x64   input_conv 3 -> 128
            encoder 0-2   ResBlock(128 -> 128), ResBlock(128 -> 128), Downsample(128)
    32x32   encoder 3-5   ResBlock(128 -> 256), ResBlock(256 -> 256), Downsample(256)
    16x16   encoder 6-8   ResBlock(256 -> 384) + Attention, ResBlock(384 -> 384) + Attention, Downsample(384)
     8x8    encoder 9-10  ResBlock(384 -> 512) + Attention, ResBlock(512 -> 512) + Attention
     8x8    middle        ResBlock(512 -> 512) + Attention + ResBlock(512 -> 512)
     8x8    decoder 0-2   ResBlock(512+512, 512+512, 512+384 -> 512) + Attention, then Upsample(512)
    16x16   decoder 3-5   ResBlock(512+384, 384+384, 384+256 -> 384) + Attention, then Upsample(384)
    32x32   decoder 6-8   ResBlock(384+256, 256+256, 256+128 -> 256), then Upsample(256)
    64x64   decoder 9-11  ResBlock(256+128, 128+128, 128+128 -> 128)
    64x64   out           GroupNorm, SiLU, Conv2d(128 -> 6): eps and the variance output, 3 channels each
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def group_norm(channels, min_group_channels=4):
    """GroupNorm with DDPM's 32 groups, halved until each holds at least min_group_channels channels: groups of one
    (instance norm) erase each feature map's mean, after the first conv the image's colour. DDPM's rule (1) makes
    those at the CPU demo's 32 channels; 4 leaves the paper's models (128 channels and up) as they were."""
    groups = math.gcd(32, channels)  # a power of two that divides channels, so every halving divides it too
    while groups > 1 and channels // groups < min_group_channels:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def zero_init(module):
    # as DDPM's and Improved DDPM's code: each residual block starts as the identity, the network's output at zero
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def timestep_embedding(t, dim, max_period=10000):
    """Transformer sinusoidal embedding of integer timesteps (DDPM App. B): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (half,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """Two 3x3 convs; the timestep enters between them as GroupNorm(h)*(1+scale)+shift (Improved DDPM App. A)."""

    def __init__(self, in_channels, out_channels, emb_channels, dropout, min_group_channels=4):
        super().__init__()
        self.norm1 = group_norm(in_channels, min_group_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)  # one scale and one shift per channel
        self.norm2 = group_norm(out_channels, min_group_channels)
        self.dropout = Dropout(dropout)  # nn.Dropout, with a cheaper mask on the CPU: see the end of the file
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv matches the channels of the skip path when the block changes them
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # (B, out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


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
        # channels last, so each head's d channels are contiguous (else SDPA runs its slow math kernel); a no-op if so
        qkv = qkv.contiguous(memory_format=torch.channels_last)
        qkv = qkv.flatten(2).transpose(1, 2).reshape(B, H * W, 3 * self.num_heads, C // self.num_heads)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=1)  # (B, heads, HW, d) each
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, (B, heads, HW, d)
        h = h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), stored channels last
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)  # a learned halving of H and W

    def forward(self, x):
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)  # smooths the blocky nearest-neighbour copy

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C, 2H, 2W)


class EmbedSequential(nn.Sequential):
    """One encoder/decoder entry, e.g. ResBlock + Attention; only the ResBlocks need the embedding. checkpointing: run
    each ResBlock and Attention again in the backward from its input alone (less memory, ~1/3 more compute);
    checkpoint() restores the random state, so dropout draws the same mask both times."""

    def forward(self, h, emb, checkpointing=False):
        for layer in self:
            inputs = (h, emb) if isinstance(layer, ResBlock) else (h,)
            if checkpointing and isinstance(layer, (ResBlock, Attention)):
                h = torch.utils.checkpoint.checkpoint(layer, *inputs, use_reentrant=False)
            else:
                h = layer(*inputs)
        return h


class UNet(nn.Module):
    """x (B, in_channels, H, W), t (B,) int64 timesteps, y (B,) int64 labels iff num_classes is set (num_classes itself:
    "no class", classifier-free guidance's null label), low_res (B, cond_channels, h, w) iff cond_channels > 0 (the
    super-resolution input, enlarged here to H x W) -> [eps, variance_output] (B, 2*in_channels, H, W) if learn_sigma,
    else eps. attention_resolutions: the feature-map sizes with attention, counted for an image_size input."""

    def __init__(self, image_size=64, in_channels=3, base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attention_resolutions=(16, 8), num_heads=4, dropout=0.1, learn_sigma=True, num_classes=None,
                 cond_channels=0, min_group_channels=4, checkpointing=False):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.cond_channels = cond_channels
        self.checkpointing = checkpointing
        emb_channels = 4 * base_channels

        def res_entry(in_ch, out_ch, attention):  # a ResBlock, followed by Attention if asked
            layers = [ResBlock(in_ch, out_ch, emb_channels, dropout, min_group_channels)]
            if attention:
                layers.append(Attention(out_ch, num_heads, min_group_channels))
            return layers

        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        # one more embedding than classes: the null label, which train.py puts in place of a dropped label
        self.label_embed = nn.Embedding(num_classes + 1, emb_channels) if num_classes is not None else None

        # encoder: per level, num_res_blocks ResBlocks, then halve the resolution (except at the last level)
        self.input_conv = nn.Conv2d(in_channels + cond_channels, base_channels, 3, padding=1)
        skip_channels = [base_channels]  # channels of every skip the encoder pushes, for the decoder to pop
        ch, resolution = base_channels, image_size
        self.encoder = nn.Sequential()
        for level, mult in enumerate(channel_mult):
            attention = resolution in attention_resolutions
            for _ in range(num_res_blocks):
                self.encoder.append(EmbedSequential(*res_entry(ch, base_channels * mult, attention)))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.encoder.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2

        self.middle = EmbedSequential(*res_entry(ch, ch, attention=True), *res_entry(ch, ch, attention=False))

        # decoder: mirror image, with one extra ResBlock per level to consume the skip of the Downsample / input conv
        self.decoder = nn.Sequential()
        for level, mult in reversed(list(enumerate(channel_mult))):
            attention = resolution in attention_resolutions
            for i in range(num_res_blocks + 1):
                layers = res_entry(ch + skip_channels.pop(), base_channels * mult, attention)
                ch = base_channels * mult
                if level != 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.decoder.append(EmbedSequential(*layers))

        # learn_sigma: the extra in_channels outputs are variance_output; diffusion.py makes eq. 15's v of them
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.out = nn.Sequential(group_norm(ch, min_group_channels), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x, t, y=None, low_res=None):
        assert (y is not None) == (self.num_classes is not None), "pass y exactly when the model is class-conditional"
        assert (low_res is not None) == (self.cond_channels > 0), "pass low_res exactly when cond_channels > 0"
        emb = self.time_embed(timestep_embedding(t, self.input_conv.out_channels))  # (B, 4*base)
        if y is not None:
            emb = emb + self.label_embed(y)
        emb = F.silu(emb)  # every ResBlock's emb_proj starts with this SiLU in the paper's code; do it once

        if low_res is not None:  # super-resolution, as the reference code's SuperResModel: enlarge, then put beside x_t
            low_res = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, low_res], dim=1)  # (B, in_channels + cond_channels, H, W)
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


class Dropout(nn.Dropout):
    """nn.Dropout with a CPU mask at a quarter of the cost: the CPU's serial generator made the mask 5% of a training
    step, so one 64-bit draw gives four 16-bit integers. GPUs and torch.compile keep nn.Dropout's own kernel."""

    def forward(self, x):
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
        bits = bits.view(torch.int16)[:x.numel()].view(x.shape)  # integers uniform on [-32768, 32767]
        keep = bits >= round(self.p * 65536) - 32768  # True with probability 1 - p (rounded to a multiple of 1/65536)
        return x * keep * (1 / (1 - self.p))

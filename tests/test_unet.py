import copy
import math

import pytest
import torch

from unet import Attention, Dropout, ResBlock, UNet, group_norm, timestep_embedding

# small enough that the whole file runs in seconds on 2 CPU cores
SMALL = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,), dropout=0.0)


def perturbed(model, std=0.05):
    """The model with every weight moved off its initial value, so zero-initialised paths carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def train_steps(model, steps, conditional):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16)
        t = torch.randint(0, 1000, (4,))
        y = torch.randint(0, 10, (4,)) if conditional else None
        loss = (model(x, t, y) - torch.randn(4, 6, 16, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("num_classes", [None, 10])
def test_output_shape(image_size, learn_sigma, num_classes):
    model = UNet(image_size=image_size, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 attention_resolutions=(16,), learn_sigma=learn_sigma, num_classes=num_classes)
    x = torch.randn(2, 3, image_size, image_size)
    y = torch.tensor([0, 9]) if num_classes else None
    out = model(x, torch.tensor([0, 999]), y)
    assert out.shape == (2, 6 if learn_sigma else 3, image_size, image_size)
    assert out.dtype == torch.float32


def test_default_config_matches_improved_ddpm_layout():
    model = UNet()
    # parameter count of openai/improved-diffusion's UNetModel at the same config (scale-shift norm, 4 heads)
    assert sum(p.numel() for p in model.parameters()) == 92_029_190
    # attention in the 2 encoder + 3 decoder blocks at 16x16 and at 8x8, and once in the middle
    assert sum(isinstance(m, Attention) for m in model.modules()) == 2 * 2 + 1 + 2 * 3
    assert len(model.encoder) == 4 * 2 + 3 and len(model.decoder) == 4 * 3


def test_group_norm_keeps_ddpm_groups_for_the_paper_and_at_least_4_channels_a_group_below():
    assert [group_norm(c).num_groups for c in (16, 32, 64, 96, 128, 256, 384, 896)] == [4, 8, 16, 16, 32, 32, 32, 32]
    assert group_norm(6).num_groups == 1 and group_norm(2).num_groups == 1  # groups must divide the channels
    assert [group_norm(c, 1).num_groups for c in (16, 32, 96, 128)] == [16, 32, 32, 32]  # DDPM's gcd(32, channels)
    # the paper's 64x64 model (train.sh's recipe) is exactly what DDPM's rule builds: 32 groups in every GroupNorm
    groups = [m.num_groups for m in UNet().modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(groups) == 2 * (8 + 2 + 12) + 11 + 1 and set(groups) == {32}


@pytest.mark.parametrize("min_group_channels, tells_apart", [(4, True), (1, False)])
def test_first_normalised_block_tells_apart_images_that_differ_only_in_colour(min_group_channels, tells_apart):
    """A colour offset c added to every pixel adds input_conv's W c, a constant per channel, to its features away
    from the border. Groups of one channel (instance norm) subtract each channel's mean and so erase it."""
    torch.manual_seed(0)
    model = UNet(image_size=32, **dict(SMALL, min_group_channels=min_group_channels))
    x = torch.rand(1, 3, 32, 32) - 0.5
    colour = torch.tensor([0.4, -0.1, -0.3]).view(1, 3, 1, 1)  # a shift towards red, as a tint would be
    h = model.input_conv(x)  # (1, 32, 32, 32)
    shift = (model.input_conv(x + colour) - h)[:, :, 16:17, 16:17]  # (1, 32, 1, 1): W c, read off an inner pixel
    assert shift.abs().max() > 0.05
    norm = model.encoder[0][0].norm1
    difference = (norm(h + shift) - norm(h)).abs().max()
    assert (difference > 0.1) if tells_apart else (difference < 1e-4)


def test_timestep_embedding_closed_form():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)  # frequencies 10000^(-i/4), i = 0..3
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    assert torch.allclose(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]))


def test_zero_at_init_then_not_after_one_step():
    torch.manual_seed(0)
    model = UNet(image_size=16, **SMALL)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 100, 999])
    assert torch.equal(model(x, t), torch.zeros(4, 6, 16, 16))
    # every block starts as the identity: its residual branch ends in a zero-initialised layer
    h, emb = torch.randn(2, 32, 16, 16), torch.randn(2, 128)
    assert torch.equal(ResBlock(32, 32, 128, 0.0)(h, emb), h)
    assert torch.equal(Attention(32, 4)(h), h)

    train_steps(model, 1, conditional=False)
    assert model(x, t).abs().mean() > 1e-4  # Adam moved the output conv by ~lr


def test_output_depends_on_t_and_y():
    torch.manual_seed(0)
    model = train_steps(UNet(image_size=16, num_classes=10, **SMALL), 5, conditional=True).eval()
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([10, 10]), torch.tensor([3, 3])
    out = model(x, t, y)
    # after a few Adam steps of lr 1e-3 the weights behind t and y have moved by ~1e-3; expect a change that size
    assert (model(x, torch.tensor([900, 900]), y) - out).abs().max() > 1e-4
    assert (model(x, t, torch.tensor([7, 7])) - out).abs().max() > 1e-4
    assert torch.equal(model(x, t, y), out)  # eval mode is deterministic, so the differences above are real


def test_attention_matches_softmax_formula():
    torch.manual_seed(0)
    B, C, H, W, heads = 2, 32, 4, 5, 4
    block = perturbed(Attention(C, heads).double(), std=0.5)
    x = torch.randn(B, C, H, W, dtype=torch.float64)

    # GroupNorm by hand: 8 groups of 4 channels, statistics over each group's channels and positions
    assert block.norm.num_groups == 8
    xs = x.reshape(B, 8, -1)
    xn = ((xs - xs.mean(-1, keepdim=True)) / torch.sqrt(xs.var(-1, unbiased=False, keepdim=True) + 1e-5))
    xn = xn.reshape(B, C, H * W) * block.norm.weight[:, None] + block.norm.bias[:, None]
    qkv = torch.einsum("oc,bcl->bol", block.qkv.weight[:, :, 0, 0], xn) + block.qkv.bias[:, None]  # (B, 3C, L)
    d = C // heads
    q, k, v = (qkv[:, i * C:(i + 1) * C].reshape(B, heads, d, H * W) for i in range(3))  # (B, heads, d, L)
    weights = torch.softmax(torch.einsum("bhdl,bhdm->bhlm", q, k) / math.sqrt(d), dim=-1)  # (B, heads, L, L)
    out = torch.einsum("bhlm,bhdm->bhdl", weights, v).reshape(B, C, H * W)
    out = torch.einsum("oc,bcl->bol", block.proj.weight[:, :, 0, 0], out) + block.proj.bias[:, None]
    expected = x + out.reshape(B, C, H, W)

    assert torch.allclose(block(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_uses_a_fused_sdpa_kernel(memory_format):
    """q, k, v must reach scaled_dot_product_attention with each head's channels contiguous; with strided ones
    PyTorch silently falls back to its math kernel, which also stores the (HW x HW) attention matrix."""
    block = Attention(64, 4)
    x = torch.randn(2, 64, 8, 8).to(memory_format=memory_format)
    with torch.profiler.profile() as profile:
        block(x)
    kernels = {event.name for event in profile.events() if "scaled_dot_product" in event.name}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in kernels, kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels, kernels


@pytest.mark.parametrize("attention_resolutions, expected_lengths", [
    ((16,), [64, 256, 256, 256]),  # encoder 1 + decoder 2 at 16x16, the middle at 8x8
    ((8,), [64, 64, 64, 64]),  # encoder 1 + middle + decoder 2, all at 8x8
])
def test_attention_runs_at_the_configured_resolution(attention_resolutions, expected_lengths):
    model = UNet(image_size=16, **dict(SMALL, attention_resolutions=attention_resolutions))
    lengths = []
    for module in model.modules():
        if isinstance(module, Attention):
            module.register_forward_hook(lambda mod, inputs, output: lengths.append(inputs[0][0, 0].numel()))
    model(torch.randn(1, 3, 16, 16), torch.tensor([5]))
    assert sorted(lengths) == expected_lengths


def test_time_embedding_computed_once_per_forward():
    model = UNet(image_size=16, **SMALL)
    calls = []
    model.time_embed.register_forward_hook(lambda mod, inputs, output: calls.append(output.shape))
    model(torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3]))
    assert calls == [(3, 128)]


def test_channels_last_and_bf16_autocast_match_fp32():
    torch.manual_seed(0)
    model = perturbed(UNet(image_size=32, num_classes=10, **SMALL)).eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 2])
    reference = model(x, t, y)
    assert reference.abs().max() > 0.1

    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out_cl = model_cl(x.to(memory_format=torch.channels_last), t, y)
    assert torch.allclose(out_cl, reference, rtol=0, atol=1e-4)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = model(x, t, y)
    assert out_bf16.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; through ~10 layers that leaves a few percent of the output scale
    assert (out_bf16.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiles_without_graph_breaks(checkpointing):
    model = UNet(image_size=16, num_classes=10, **{**SMALL, "dropout": 0.1},  # in training mode: dropout on
                 checkpointing=checkpointing)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_keeps_each_element_independently_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    x = torch.ones(64, 64, 32, 32, requires_grad=True)  # 4M elements: the kept fraction to 5 sd (±0.0007 at p = 0.1)
    y = Dropout(p)(x)
    kept = y != 0
    assert torch.all(y[kept] == 1 / (1 - p))  # survivors scaled so that E[y] = x
    sd = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    # each 16-bit lane of the 64-bit random draws (an int64 sign bit that is never set would keep all of lane 3),
    # and neighbours independent: P(both kept) = (1 - p)^2
    lanes = kept.flatten().view(-1, 4).float()  # (N/4, 4)
    assert torch.allclose(lanes.mean(0), torch.full((4,), 1 - p), atol=10 * sd)
    assert abs((lanes[:, 0] * lanes[:, 1]).mean().item() - (1 - p) ** 2) < 10 * sd
    y.sum().backward()  # the gradient passes through the kept elements only, with the same scale
    assert torch.equal(x.grad, kept.float() / (1 - p))


def test_dropout_is_seeded_and_off_in_eval_mode():
    dropout, x = Dropout(0.1), torch.randn(8, 16, 8, 8)
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(dropout(x), first)  # the global seed decides the mask: runs are reproducible
    assert not torch.equal(dropout(x), first)
    assert dropout.eval()(x) is x


def bilinear_by_hand(image, size):
    """(B, C, s, s) -> (B, C, size, size): output pixel i sits at input coordinate (i + 1/2) s / size - 1/2 (pixel
    centres aligned), clamped to the image, and mixes its two neighbours by distance, along rows then columns."""
    s = image.shape[-1]
    position = ((torch.arange(size) + 0.5) * s / size - 0.5).clamp(0, s - 1)
    below = position.floor().long()
    above = (below + 1).clamp(max=s - 1)
    weight = position - below  # (size,)
    rows = image[..., below, :] * (1 - weight)[:, None] + image[..., above, :] * weight[:, None]  # (B, C, size, s)
    return rows[..., below] * (1 - weight) + rows[..., above] * weight


@pytest.mark.parametrize("low_size", [4, 5, 16])
def test_low_res_comes_at_its_own_size_and_the_network_enlarges_it_bilinearly(low_size):
    """Super-resolution: low_res (B, 3, S, S) is enlarged to x's H x W inside the network (bilinear, pixel centres
    aligned, as the reference code's SuperResModel) and put beside x_t; at S = H it goes in unchanged."""
    torch.manual_seed(0)
    model = perturbed(UNet(image_size=16, cond_channels=3, **SMALL)).eval()
    seen = []
    model.input_conv.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    low_res = torch.rand(2, 3, low_size, low_size) * 2 - 1
    enlarged = bilinear_by_hand(low_res, 16)
    out = model(x, t, low_res=low_res)
    assert out.shape == (2, 6, 16, 16) and out.abs().max() > 0.1
    assert seen[0].shape == (2, 6, 16, 16) and torch.equal(seen[0][:, :3], x)
    assert torch.allclose(seen[0][:, 3:], enlarged, rtol=0, atol=1e-6)
    assert torch.allclose(model(x, t, low_res=enlarged), out, rtol=0, atol=1e-5)  # as if enlarged by the caller
    assert torch.equal(seen[1][:, 3:], enlarged)  # an image already at x's size is not changed
    if low_size == 16:
        assert torch.equal(out, model(x, t, low_res=enlarged))
    colour = torch.tensor([0.5, -0.25, 0.75]).view(1, 3, 1, 1)
    model(x, t, low_res=colour.expand(2, 3, low_size, low_size))
    assert torch.allclose(seen[-1][:, 3:], colour.expand(2, 3, 16, 16), rtol=0, atol=1e-6)  # a constant stays constant

"""What small and older GPUs run, rehearsed on the CPU: fp16 with a gradient scaler that skips overflowing steps,
--microbatch (the same step in chunks) and --checkpointing (activation checkpointing)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402  (tests/bench.py: the saved-for-backward accounting of its GPU memory estimate)
import train  # noqa: E402
import util  # noqa: E402
from test_train import TINY, run, write_images  # noqa: E402


@pytest.fixture
def images(tmp_path):
    return write_images(str(tmp_path / "images"), 12)


def build(flags):
    """What train.py builds for these flags, on the CPU: (args, model, ema, diffusion, optimizer, scaler)."""
    args = train.parse_args([*TINY, "--out_dir", os.path.join(os.sep, "nonexistent", "run"), *flags])  # no resume
    torch.manual_seed(0)
    model, ema, diffusion, optimizer, scaler, _ = train.build_or_resume(
        args, vars(args), torch.device("cpu"), util.autocast_dtype("cpu", args.precision))
    return args, model, ema, diffusion, optimizer, scaler


def snapshot(model, ema, optimizer):
    return ([p.detach().clone() for p in model.parameters()], [p.clone() for p in ema.parameters()],
            {i: {k: v.clone() for k, v in state.items()} for i, state in optimizer.state_dict()["state"].items()})


def assert_same(a, b):
    for before, after in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(before, after)
    for index, state in a[2].items():
        for name, value in state.items():
            assert torch.equal(value, b[2][index][name]), f"optimizer state {index}.{name} changed"


def overflow_at(diffusion, calls):
    """Make training_losses' loss infinite at the given call numbers (1-based), as an fp16 overflow would."""
    original, count = diffusion.training_losses, []

    def training_losses(*args, **kwargs):
        count.append(1)
        losses = original(*args, **kwargs)
        if len(count) in calls:
            losses["loss"] = losses["loss"] * float("inf")
        return losses
    diffusion.training_losses = training_losses


# -- fp16 on the CPU ---------------------------------------------------------------------------------------------


def test_fp16_training_saves_a_finite_scaler_state_and_resumes_exactly(images, tmp_path):
    flags = ["--precision", "fp16", "--dropout", "0.1", "--save_every", "100", "--sample_every", "0"]
    run(images, tmp_path / "straight", "--max_steps", "4", *flags)
    run(images, tmp_path / "resumed", "--max_steps", "2", *flags)
    run(images, tmp_path / "resumed", "--max_steps", "4", *flags)
    a = util.load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = util.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert a["config"]["precision"] == "fp16"
    scale = a["scaler"]["scale"]
    assert 0 < scale < float("inf") and scale == 2.0 ** 16  # no overflow in 4 steps: the initial scale, kept
    assert a["scaler"] == b["scaler"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_an_overflowing_fp16_step_changes_neither_weights_nor_adamw_and_halves_the_scale(monkeypatch):
    args, model, ema, diffusion, optimizer, scaler = build(["--precision", "fp16", "--importance_sampling"])
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    for step in range(2):
        train.training_step(model, model, ema, diffusion, optimizer, scaler, x0, step, args, torch.float16)
    before, scale, counts = snapshot(model, ema, optimizer), scaler.get_scale(), diffusion.loss_counts.clone()
    overflow_at(diffusion, {1})
    loss, losses, grad_norm, finite_step = train.training_step(model, model, ema, diffusion, optimizer, scaler, x0, 2,
                                                               args, torch.float16)
    assert not finite_step and not torch.isfinite(loss) and not torch.isfinite(grad_norm)
    after = snapshot(model, ema, optimizer)
    assert_same((before[0], [], before[2]), (after[0], [], after[2]))  # weights, AdamW moments and step count
    decay = (1 + 2) / (10 + 2)  # the EMA's at step 2, warmed up: it moves towards the unchanged weights as ever
    for weight, ema_before, ema_after in zip(before[0], before[1], after[1], strict=True):
        assert torch.allclose(ema_after, decay * ema_before + (1 - decay) * weight, atol=1e-7)
    assert scaler.get_scale() == scale / 2
    assert torch.equal(diffusion.loss_counts, counts) and torch.isfinite(diffusion.loss_history).all()
    _, _, _, finite_step = train.training_step(model, model, ema, diffusion, optimizer, scaler, x0, 3, args,
                                               torch.float16)
    assert finite_step and diffusion.loss_counts.sum() == counts.sum() + 4
    after = snapshot(model, ema, optimizer)
    assert not torch.equal(before[0][0], after[0][0]) and not torch.equal(before[1][0], after[1][0])


def test_one_skipped_fp16_step_is_logged_and_the_run_goes_on(images, tmp_path, monkeypatch):
    build_model = util.build_model_and_diffusion

    def with_an_overflow_at_step_3(config):
        model, diffusion = build_model(config)
        overflow_at(diffusion, {3})
        return model, diffusion

    monkeypatch.setattr(util, "build_model_and_diffusion", with_an_overflow_at_step_3)
    out = tmp_path / "run"
    assert run(images, out, "--precision", "fp16", "--max_steps", "6", "--log_every", "3", "--sample_every", "0",
               "--importance_sampling") == 6
    rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()]
    header, first, second = rows
    assert header[-2:] == ["skipped", "loss_scale"]
    assert first[header.index("skipped")] == "1" and second[header.index("skipped")] == "0"
    assert float(first[header.index("loss_scale")]) == 2.0 ** 15  # halved once
    for row in (first, second):
        for column in ("loss", "mse", "vb", "grad_norm"):
            assert 0 < float(row[header.index(column)]) < float("inf")  # averages over the steps taken
    checkpoint = util.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["step"] == 6 and checkpoint["scaler"]["scale"] == 2.0 ** 15
    assert torch.isfinite(checkpoint["diffusion"]["loss_history"]).all()
    assert checkpoint["diffusion"]["loss_counts"].sum() == 5 * 4  # the skipped step's infinite losses left out


def test_max_skipped_steps_in_a_row_stop_fp16_with_one_line_and_keep_the_last_good_checkpoint(images, tmp_path,
                                                                                            monkeypatch):
    build_model = util.build_model_and_diffusion

    def diverging_from_step_3(config):
        model, diffusion = build_model(config)
        overflow_at(diffusion, set(range(3, 100)))
        return model, diffusion

    monkeypatch.setattr(util, "build_model_and_diffusion", diverging_from_step_3)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        run(images, out, "--precision", "fp16", "--max_steps", "20", "--max_skipped_steps", "4", "--save_every", "2",
            "--log_every", "10", "--sample_every", "0")
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("error: 4 steps in a row up to step 6")  # steps 3, 4, 5, 6
    assert "loss scale down to 4096" in message and "--lr" in message  # 2^16 halved 4 times
    checkpoint = util.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["step"] == 4  # saved at step 4 (2 skipped steps: healthy weights); not at 6, after the limit
    assert checkpoint["scaler"]["scale"] == 2.0 ** 14


# -- --microbatch ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["--importance_sampling", "--loss_type", "kl"]])
def test_microbatches_give_the_same_step_as_the_whole_batch(flags):
    results = []
    for microbatch in ([], ["--microbatch", "2"]):
        args, model, ema, diffusion, optimizer, scaler = build(["--batch_size", "8", "--dropout", "0", *flags,
                                                                *microbatch])
        x0 = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.manual_seed(2)  # the same t and noise
        loss, losses, grad_norm, _ = train.training_step(model, model, ema, diffusion, optimizer, scaler, x0, 0, args,
                                                         None)
        results.append((loss, losses["loss"], grad_norm, list(model.parameters()), diffusion.loss_counts.clone()))
    (loss_a, per_a, norm_a, params_a, counts_a), (loss_b, per_b, norm_b, params_b, counts_b) = results
    assert torch.allclose(per_a, per_b, rtol=1e-5) and torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert torch.allclose(norm_a, norm_b, rtol=1e-4)
    assert torch.equal(counts_a, counts_b)  # importance sampling recorded every chunk's examples
    assert counts_a.sum() == (8 if flags else 0)
    for a, b in zip(params_a, params_b):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(params_a, build(flags)[1].parameters()))  # the step did move


def test_microbatch_must_divide_the_batch(tmp_path):
    with pytest.raises(SystemExit, match="--microbatch 3 must divide --batch_size 4"):
        train.main([*TINY, "--microbatch", "3", "--out_dir", str(tmp_path / "run")])


def test_microbatch_and_checkpointing_may_change_between_resumes(images, tmp_path):
    out = tmp_path / "run"
    run(images, out, "--max_steps", "2", "--sample_every", "0")
    assert run(images, out, "--max_steps", "4", "--sample_every", "0", "--microbatch", "2", "--checkpointing") == 4
    assert run(images, out, "--max_steps", "5", "--sample_every", "0") == 5
    assert util.load_checkpoint(out / "ckpt.pt")["step"] == 5


def test_torchrun_with_microbatches_matches_whole_batches(images, tmp_path):
    """Two gloo processes; with --microbatch only the last chunk's backward all-reduces (no_sync before it)."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import train
        train.main(sys.argv[1:])
    """))
    checkpoints = []
    for name, microbatch in (("whole", []), ("chunks", ["--microbatch", "2"])):
        out = tmp_path / name
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
                   "--data_dir", images, "--out_dir", str(out), *TINY, "--max_steps", "2", "--sample_every", "0",
                   "--dropout", "0", "--precision", "fp32", "--lr", "3e-4", *microbatch]  # atol 1e-7: ~1/3000 of a step
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        checkpoints.append(util.load_checkpoint(out / "ckpt.pt"))
    whole, chunks = checkpoints
    assert whole["step"] == chunks["step"] == 2
    for name, value in whole["model"].items():
        assert torch.allclose(value, chunks["model"][name], rtol=1e-5, atol=1e-7), name


# -- --checkpointing ---------------------------------------------------------------------------------------------


def gradients(flags):
    """The gradients of one hybrid loss on fixed images, t and noise, of a model whose weights are all off zero (at
    initialisation the zeroed output conv would give every other weight a zero gradient)."""
    _, model, _, diffusion, _, _ = build(flags)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(3)  # the noise, then the dropout masks
    diffusion.training_losses(model, x0, torch.tensor([5, 20, 35, 49]))["loss"].mean().backward()
    assert model.checkpointing == ("--checkpointing" in flags)
    return [p.grad for p in model.parameters()]


def test_checkpointing_gives_the_same_gradients_with_dropout():
    """The recomputation in the backward must draw the same dropout mask as the forward did."""
    plain, checkpointed = gradients(["--dropout", "0.1"]), gradients(["--dropout", "0.1", "--checkpointing"])
    assert all(g.abs().max() > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    # and dropout was on: without it (the same noise: it is drawn before the network runs) the gradients differ
    without_dropout = gradients(["--dropout", "0"])
    assert not all(torch.allclose(a, b, rtol=1e-2, atol=1e-5) for a, b in zip(plain, without_dropout))


def test_checkpointing_keeps_a_third_less_for_the_backward_at_the_anime64_shapes():
    """tests/bench.py's estimate, from the tensors one forward keeps for its backward (fake tensors: no arithmetic)."""
    plain = bench.estimate_gpu_memory(bench.CONFIGS["anime64"])["per_image"]  # bytes per image, bf16 autocast
    checkpointed = bench.estimate_gpu_memory(bench.CONFIGS["anime64"] + ["--checkpointing"])["per_image"]
    assert 150 * 2 ** 20 < plain < 210 * 2 ** 20  # ~178 MiB an image
    assert checkpointed < (2 / 3) * plain

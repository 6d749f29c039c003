"""Checkpoints that cannot be silently wrong: every unreadable file gets one line, a checksum catches damage, and the
checkpoint a save replaces is kept as ckpt.prev.pt, for train.py to resume from."""
import copy
import importlib
import os
import pickletools
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402
from test_sample_eval import fails_with_one_line  # noqa: E402
from test_train import TINY, write_images  # noqa: E402

evaluate = importlib.import_module("eval")  # the script eval.py; the name `eval` is Python's built-in


def small_checkpoint():
    """A checkpoint shaped like train.py's (weights, their EMA, AdamW's state, step, config), with a bf16 and a
    non-contiguous tensor too, small enough to load a thousand times in a few seconds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                torch.nn.Linear(64, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 3, 6, 6)).sum().backward()
    optimizer.step()
    return dict(model=model.state_dict(), ema=copy.deepcopy(model.state_dict()), optimizer=optimizer.state_dict(),
                extra=dict(bf16=torch.randn(5, dtype=torch.bfloat16), transposed=torch.randn(3, 4).t()),
                step=3, config={"image_size": 16, "channel_mult": (1, 2), "lr": 1e-3, "classes": None})


def same(a, b):
    """The same structure, types and values: tensors bit for bit with their dtype and shape, dicts in order."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def record_bytes(path, name):
    """The byte offsets in the file of the zip record whose name ends with name (stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        info = next(info for info in archive.infolist() if info.filename.endswith(name))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    start = info.header_offset + 30 + name_length + extra_length
    return range(start, start + info.file_size)


def change_byte(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x10
    open(path, "wb").write(data)


def damage(path):
    """Change one byte in the data of the file's largest tensor, as a disk error or a bad copy might."""
    with zipfile.ZipFile(path) as archive:
        largest = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    change_byte(path, record_bytes(path, largest.filename)[largest.file_size // 2])


def refusal(path):
    """load_checkpoint's one-line message for path, or None if it loaded."""
    try:
        util.load_checkpoint(path)
    except ValueError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------------------
# the checksum


def test_a_flipped_bit_in_any_record_of_the_archive_is_refused_as_damaged_naming_it(tmp_path):
    """torch.save writes the CRC-32 of every record (the pickle, each tensor's bytes, its version files), which
    torch.load does not check: load_checkpoint does, for each record, its first and its last byte."""
    path = tmp_path / "ckpt.pt"
    util.save_checkpoint(small_checkpoint(), path)
    good = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        names = [info.filename for info in archive.infolist()]
    assert len([name for name in names if "/data/" in name]) > 10  # a record per tensor
    for name in names:
        for offset in (record_bytes(path, name)[0], record_bytes(path, name)[-1]):
            data = bytearray(good)
            data[offset] ^= 1
            path.write_bytes(data)
            message = refusal(path)
            assert message and f"{path} is damaged" in message and name in message, (name, message)
    path.write_bytes(good)
    assert same(util.load_checkpoint(path), small_checkpoint())


def test_a_changed_byte_in_a_tensor_is_refused_as_damaged_naming_the_previous_checkpoint(tmp_path):
    path, previous = tmp_path / "ckpt.pt", tmp_path / "ckpt.prev.pt"
    util.save_checkpoint({**small_checkpoint(), "step": 1}, path)
    util.save_checkpoint(small_checkpoint(), path)
    damage(path)
    message = refusal(path)
    assert message is not None and len(message.splitlines()) == 1
    assert f"{path} is damaged: its contents do not match the checksum" in message
    assert f"{previous}, the checkpoint saved before it, may be intact" in message
    changed = torch.load(path, weights_only=True)  # what loading without the check gives: other weights, no word
    assert any(not same(changed[key], value) for key, value in small_checkpoint().items())
    assert util.load_checkpoint(previous)["step"] == 1


def test_a_loaded_checkpoint_saved_again_keeps_a_valid_checksum(tmp_path):
    util.save_checkpoint(small_checkpoint(), tmp_path / "a.pt")
    loaded = util.load_checkpoint(tmp_path / "a.pt")
    assert "checksum" not in loaded and same(loaded, small_checkpoint())
    util.save_checkpoint({**loaded, "checksum": "crc32:00000000"}, tmp_path / "b.pt")  # a stale one is replaced
    assert same(util.load_checkpoint(tmp_path / "b.pt"), small_checkpoint())


def test_checkpoints_saved_before_checksums_load_and_a_pickle_cut_short_is_refused(tmp_path):
    old = tmp_path / "old.pt"
    torch.save(small_checkpoint(), old)  # no "checksum" entry: what util.save_checkpoint wrote before it had one
    assert same(util.load_checkpoint(old), small_checkpoint())

    # A byte that ends the pickle early (a STOP opcode after an inner dict is complete) makes torch.load return
    # that inner dict: the CRC-32 of the pickle refuses it, instead of loading a part as if it were the whole
    new = tmp_path / "new.pt"
    util.save_checkpoint(small_checkpoint(), new)
    pickle_bytes = record_bytes(new, "data.pkl")
    with zipfile.ZipFile(new) as archive:
        ops = list(pickletools.genops(archive.read(archive.infolist()[0])))
    after_first_setitems = next(position for (op, _, _), (_, _, position) in zip(ops, ops[1:])
                                if op.name == "SETITEMS")
    data = bytearray(new.read_bytes())
    data[pickle_bytes[after_first_setitems]] = ord(".")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data)
    inner = torch.load(cut, weights_only=True)
    assert isinstance(inner, dict) and "config" not in inner  # the hazard: a part loads as if the whole
    message = refusal(cut)
    assert message and f"{cut} is damaged" in message and "data.pkl" in message


# ----------------------------------------------------------------------------------------------------------
# fuzzing: whatever the file holds, one line or the right contents


def test_fuzz_every_damaged_file_is_refused_in_one_line_or_loads_unchanged(tmp_path):
    """Random bytes, truncations and changed bytes (anywhere; and in the pickle, where a byte changes structure):
    each is refused with a one-line ValueError that names the file, or (a byte outside the contents: zip padding,
    a CRC torch does not read) loads exactly the saved contents. Any other exception fails the test."""
    good_path = tmp_path / "ckpt.pt"
    util.save_checkpoint(small_checkpoint(), good_path)
    good, pickle_bytes = good_path.read_bytes(), record_bytes(good_path, "data.pkl")
    with zipfile.ZipFile(good_path) as archive:
        tensor_bytes = [offset for info in archive.infolist() if "/data/" in info.filename
                        for offset in record_bytes(good_path, info.filename)]
    rng = random.Random(0)
    cases = [("random", rng.randbytes(rng.randint(1, 8192))) for _ in range(150)]
    cases += [("truncated", good[:n]) for n in sorted(rng.sample(range(len(good)), 150))]
    for _ in range(300):
        changed = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            changed[rng.randrange(len(good))] = rng.getrandbits(8)
        cases.append(("changed", bytes(changed)))
    for kind, offsets, count in (("pickle", pickle_bytes, 300), ("tensor", tensor_bytes, 150)):
        for _ in range(count):
            changed = bytearray(good)
            changed[rng.choice(offsets)] ^= 1 << rng.randrange(8)
            cases.append((kind, bytes(changed)))

    path, outcomes = tmp_path / "fuzzed.pt", {}
    for kind, data in cases:
        path.write_bytes(data)
        message = refusal(path)
        if message is None:
            assert kind in ("changed", "pickle") and same(util.load_checkpoint(path), small_checkpoint())
            outcome = "loaded unchanged"
        else:
            assert len(message.splitlines()) == 1 and str(path) in message, message
            outcome = "damaged" if "is damaged: its contents do not match the checksum" in message else "refused"
        outcomes[kind, outcome] = outcomes.get((kind, outcome), 0) + 1
    assert outcomes["random", "refused"] == 150 and outcomes["truncated", "refused"] == 150
    # torch.load loads all of these without a word; the checksum is what refuses them
    assert outcomes["tensor", "damaged"] == 150
    assert outcomes["changed", "damaged"] > 10 and outcomes["pickle", "damaged"] > 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run of 2 steps saved at each: ckpt.pt at step 2, ckpt.prev.pt at step 1; and its images."""
    base = tmp_path_factory.mktemp("checkpoints")
    images = write_images(str(base / "images"), 8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "save_samples", lambda *args: None)  # the grids take longer than the training
        train.main(["--data_dir", images, "--out_dir", str(base / "run"), *TINY, "--max_steps", "2",
                    "--save_every", "1", "--sample_every", "0"])
    return images, base / "run"


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_scripts_refuse_unreadable_checkpoints_in_one_line(trained, tmp_path):
    out = copy_of(trained[1], tmp_path)
    ckpt, previous = out / "ckpt.pt", out / "ckpt.prev.pt"
    damage(ckpt)
    for script in ("sample.py", "eval.py"):  # the real scripts: no traceback, and they do not fall back
        line = fails_with_one_line(script, ckpt, "--out", tmp_path / script)
        assert f"{ckpt} is damaged" in line and f"{previous}, the checkpoint saved before it, may be intact" in line
    assert not (tmp_path / "sample.py").exists() and not (tmp_path / "eval.py").exists()

    good, damaged = previous.read_bytes(), ckpt.read_bytes()
    for data in (random.Random(1).randbytes(3000), good[:len(good) // 3], good[:200], damaged):
        bad = tmp_path / "bad" / "ckpt.pt"  # alone in its folder: train.py has no ckpt.prev.pt to resume from
        bad.parent.mkdir(exist_ok=True)
        bad.write_bytes(data)
        for main in (sample.main, evaluate.main):
            with pytest.raises(SystemExit) as error:
                main([str(bad), "--out", str(tmp_path / "out")])
            assert str(error.value).startswith("error: ") and len(str(error.value).splitlines()) == 1
            assert str(bad) in str(error.value)
        with pytest.raises(SystemExit) as error:
            train.main(["--data_dir", trained[0], "--out_dir", str(bad.parent), *TINY])
        assert str(error.value).startswith("error: ") and len(str(error.value).splitlines()) == 1
        assert str(bad) in str(error.value) and "move it away to start a new run" in str(error.value)
        assert bad.read_bytes() == data

    os.remove(ckpt)  # as a kill between save_checkpoint's two renames leaves it
    with pytest.raises(SystemExit) as error:
        evaluate.main([str(ckpt), "--out", str(tmp_path / "out")])
    assert f"{ckpt} does not exist" in str(error.value)
    assert f"{previous}, the checkpoint saved before it, may be intact" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# ckpt.prev.pt: kept at each save, resumed from when ckpt.pt is missing or damaged


def test_each_save_keeps_the_checkpoint_it_replaces(tmp_path):
    path = tmp_path / "ckpt.pt"
    for step in (1, 2, 3):
        util.save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.prev.pt", "ckpt.pt"]
    assert util.load_checkpoint(path)["step"] == 3 and util.load_checkpoint(tmp_path / "ckpt.prev.pt")["step"] == 2


@pytest.mark.parametrize("how", ["damaged", "missing"])
def test_train_resumes_from_the_previous_checkpoint_and_says_so(trained, tmp_path, capsys, monkeypatch, how):
    images, run = trained
    out = copy_of(run, tmp_path)
    ckpt, previous = out / "ckpt.pt", out / "ckpt.prev.pt"
    assert util.load_checkpoint(ckpt)["step"] == 2 and util.load_checkpoint(previous)["step"] == 1
    if how == "damaged":
        damage(ckpt)
    else:
        os.remove(ckpt)  # a kill between save_checkpoint's two renames
    monkeypatch.setattr(train, "save_samples", lambda *args: None)
    capsys.readouterr()
    assert train.main(["--data_dir", images, "--out_dir", str(out), *TINY, "--max_steps", "3",
                       "--sample_every", "0"]) == 3
    problem = "is damaged or unreadable" if how == "damaged" else "is missing"
    kept = f" (the damaged file is kept as {ckpt}.damaged)" if how == "damaged" else ""
    expected = f"{ckpt} {problem}: resuming from {previous}, the checkpoint saved before it, at step 1{kept}"
    assert expected in capsys.readouterr().err.splitlines()
    assert util.load_checkpoint(ckpt)["step"] == 3
    steps = [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()]
    assert steps == ["step", "1", "2", "3"]  # step 2 trained again, from step 1's state
    # the damaged file was moved aside, so the save at step 3 kept the good step-1 checkpoint as ckpt.prev.pt
    assert util.load_checkpoint(previous)["step"] == 1
    if how == "damaged":
        assert "is damaged" in refusal(out / "ckpt.pt.damaged")


@pytest.mark.parametrize("how", ["both damaged", "missing and damaged"])
def test_train_stops_in_one_line_and_changes_nothing_when_no_checkpoint_is_readable(trained, tmp_path, how):
    images, run = trained
    out = copy_of(run, tmp_path)
    ckpt, previous = out / "ckpt.pt", out / "ckpt.prev.pt"
    if how == "both damaged":
        damage(ckpt)
    else:
        os.remove(ckpt)
    damage(previous)
    before = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in os.listdir(out)
              if (out / name).is_file()}
    with pytest.raises(SystemExit) as error:
        train.main(["--data_dir", images, "--out_dir", str(out), *TINY, "--max_steps", "3", "--sample_every", "0"])
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"error: {ckpt} ")
    assert f"and {previous}, the checkpoint saved before it, cannot be resumed from either" in message
    assert f"{previous} is damaged" in message and "neither was changed" in message
    after = {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns) for name in os.listdir(out)
             if (out / name).is_file()}
    assert after == before


# ----------------------------------------------------------------------------------------------------------
# a crash or kill -9 at any moment of a save


def newest_readable(path):
    """The step a resume would start from: ckpt.pt's, or ckpt.prev.pt's when ckpt.pt is missing. Every checkpoint
    file there must load: a crash may cut only path.tmp short."""
    previous = util.previous_checkpoint(path)
    steps = [util.load_checkpoint(p)["step"] for p in (path, previous) if os.path.exists(p)]
    assert steps, "no checkpoint left"
    return steps[0]


@pytest.mark.parametrize("moment", ["writing", "fsync", "renaming ckpt.pt to ckpt.prev.pt",
                                    "renaming ckpt.pt.tmp to ckpt.pt", "done"])
def test_a_crash_at_any_moment_of_a_save_leaves_a_checkpoint(tmp_path, monkeypatch, moment):
    path = tmp_path / "ckpt.pt"
    util.save_checkpoint({"step": 1}, path)
    util.save_checkpoint({"step": 2}, path)
    replace, renames = os.replace, []

    def crash(*args):
        raise KeyboardInterrupt  # where the process dies

    def replace_or_crash(src, dst):
        renames.append(f"renaming {os.path.basename(src)} to {os.path.basename(dst)}")
        if renames[-1] == moment:
            crash()
        replace(src, dst)

    def write_half_then_crash(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        crash()
    if moment == "writing":
        monkeypatch.setattr(util.torch, "save", write_half_then_crash)
    if moment == "fsync":
        monkeypatch.setattr(util.os, "fsync", crash)
    if moment.startswith("renaming"):
        monkeypatch.setattr(util.os, "replace", replace_or_crash)
    if moment == "done":
        util.save_checkpoint({"step": 3}, path)
    else:
        with pytest.raises(KeyboardInterrupt):
            util.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    if moment.startswith("renaming"):  # in this order
        assert renames == ["renaming ckpt.pt to ckpt.prev.pt", "renaming ckpt.pt.tmp to ckpt.pt"][:len(renames)]
        assert renames[-1] == moment
    expected = {"writing": 2, "fsync": 2, "renaming ckpt.pt to ckpt.prev.pt": 2, "done": 3,
                "renaming ckpt.pt.tmp to ckpt.pt": 2}[moment]  # from ckpt.prev.pt: ckpt.pt is gone
    assert newest_readable(path) == expected
    assert os.path.exists(path) == (moment != "renaming ckpt.pt.tmp to ckpt.pt")


def test_kill_9_during_saves_always_leaves_a_checkpoint(tmp_path):
    """A process saving in a loop, frozen (SIGSTOP) at random moments and finally killed (SIGKILL): the disk then
    holds what kill -9 at that moment leaves, since neither lets the process write another byte."""
    path = tmp_path / "ckpt.pt"
    saver = textwrap.dedent(f"""
        import sys
        import torch
        sys.path.insert(0, {ROOT!r})
        import util
        weights = torch.arange(1_000_000, dtype=torch.float32)  # 4 MB: a save takes milliseconds, long enough
        for step in range(1, 100000):
            util.save_checkpoint({{"step": step, "weights": weights + step}}, {str(path)!r})
    """)
    process = subprocess.Popen([sys.executable, "-c", saver])
    try:
        deadline = time.time() + 60
        while not os.path.exists(util.previous_checkpoint(path)) and time.time() < deadline:
            time.sleep(0.05)
        rng, steps = random.Random(0), []
        for _ in range(20):
            time.sleep(rng.uniform(0, 0.03))
            process.send_signal(signal.SIGSTOP)
            steps.append(newest_readable(path))
            process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait(timeout=30)
        steps.append(newest_readable(path))
    finally:
        process.kill()
    assert steps == sorted(steps) and steps[-1] > steps[0] >= 1, steps  # saves went on between the checks
    for checkpoint in (path, util.previous_checkpoint(path)):
        if os.path.exists(checkpoint):
            loaded = util.load_checkpoint(checkpoint)
            assert torch.equal(loaded["weights"], torch.arange(1_000_000, dtype=torch.float32) + loaded["step"])

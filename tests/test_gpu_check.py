"""tests/gpu_check.py, the GPU check, on the CPU: the parts that take seconds here must each report ok, in a process
of their own, with figures that make sense in OUT/summary.md. The parts that train (resume, sigterm, train_sh) take
minutes on the CPU and are run by hand: python tests/gpu_check.py OUT --device cpu --quick."""
import os
import re
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ["versions", "attention", "layouts", "checkpointing", "fp16"]  # in the script's order


def summary_rows(path):
    """{part: (status, key figure)} from the table in summary.md."""
    rows = {}
    for line in open(path).read().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0] not in ("part", "---"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def number(pattern, text):
    found = re.search(pattern, text)
    assert found, f"{pattern!r} is not in {text!r}"
    return float(found.group(1))


def test_the_quick_parts_report_ok_with_plausible_figures(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), str(out), "--device", "cpu",
                             "--quick", "--only", ",".join(PARTS)], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = summary_rows(out / "summary.md")
    assert list(rows) == PARTS
    for name, (status, figure) in rows.items():
        assert status == "ok", f"{name}: {figure}\n{(out / f'{name}.log').read_text()}"

    assert torch.__version__ in rows["versions"][1] and torch.__version__ in (out / "versions.txt").read_text()

    attention = rows["attention"][1]
    # bf16 keeps 8 bits of mantissa, fp16 11: errors of about 1e-2 and 1e-3 of the largest value, neither 0 nor 1
    assert 1e-4 < number(r"math bf16 ([-+.e\d]+)", attention) < 5e-2
    assert 1e-5 < number(r"math fp16 ([-+.e\d]+)", attention) < 1e-2
    assert number(r"unet.Attention channels_last ([-+.e\d]+)", attention) < 1e-5  # fp32 in both layouts on the CPU
    for kernel in ("flash bf16", "flash fp16", "efficient bf16", "efficient fp16"):
        assert kernel in attention  # measured, or named as skipped where the CPU has no such kernel

    assert re.search(r"GroupNorm of a channels_last input gives (channels_last|NCHW);", rows["layouts"][1])
    assert re.search(r"NCHW [.\d]+ ms, channels_last [.\d]+ ms", rows["layouts"][1])

    checkpointing = rows["checkpointing"][1]
    assert number(r"max grad difference ([-+.e\d]+)", checkpointing) < 1e-5
    assert number(r"another seed's dropout: ([-+.e\d]+)", checkpointing) > 1e-4  # dropout is on: the masks matter

    assert "injected inf: step skipped yes, scale 1024 -> 512, next step applied yes" in rows["fp16"][1]

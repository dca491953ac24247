from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchpilot.cli import main


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


SCALE = ("scale", "--ref-batch", "256", "--ref-lr", "0.1", "--batch", "8192")


def test_scale_documented_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *SCALE, "--rule", "linear")
    assert code == 0
    assert "3.2" in out and "Rule linear" in out
    code, out, _ = run(capsys, *SCALE, "--rule", "sqrt", "--format", "json")
    data = json.loads(out)
    assert round(data["lr"], 3) == 0.566


def test_scale_json_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run(
        capsys,
        "scale",
        "--ref-batch",
        "64",
        "--ref-lr",
        "1e-3",
        "--batch",
        "256",
        "--micro-batch",
        "32",
        "--world-size",
        "2",
        "--rule",
        "adam",
        "--dataset-size",
        "50000",
        "--epochs",
        "10",
        "--warmup-epochs",
        "1",
        "--format",
        "json",
    )
    assert code == 0
    data = json.loads(out)  # stdout holds only JSON
    for key in (
        "lr",
        "global_batch",
        "micro_batch",
        "accumulation_steps",
        "world_size",
        "steps_per_epoch",
        "warmup_steps",
        "rule",
        "betas",
        "eps",
    ):
        assert key in data, key
    assert (data["micro_batch"], data["accumulation_steps"], data["world_size"]) == (32, 4, 2)
    assert data["steps_per_epoch"] == 196 and data["warmup_steps"] == 196
    assert data["betas"] == pytest.approx([0.6, 0.996])
    assert data["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("scale", "--ref-batch", "256", "--ref-lr", "0.1", "--batch", "-3"),
            "--batch: expected a positive integer, got -3",
        ),
        (
            ("scale", "--ref-batch", "256", "--ref-lr", "0", "--batch", "8"),
            "--ref-lr: expected a positive number, got 0.0",
        ),
        ((*SCALE, "--rule", "cubic"), "--rule: unknown rule 'cubic'"),
        (
            (*SCALE, "--rule", "adam", "--beta1", "1.5"),
            "--beta1: expected a value in [0, 1), got 1.5",
        ),
        (
            (*SCALE, "--micro-batch", "100"),
            "--batch: 8192 is not a multiple of micro_batch × world_size",
        ),
        (("scale", "--ref-batch", "256", "--ref-lr", "0.1", "--batch", "abc"), "'--batch'"),
        (("train", "--example", "nope"), "--example: unknown example 'nope'"),
        (("check",), "TASK: give either a TASK"),
        (("check", "--example", "digits", "--device", "tpu"), "--device: unknown device 'tpu'"),
        (("check", "no/such/file.py:task"), "TASK: no such file"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert "Traceback" not in err


def test_user_code_failure_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "boom.py"
    path.write_text("def task():\n    raise KeyError('weights.pt')\n")
    code, _out, err = run(capsys, "check", f"{path}:task")
    assert code == 1
    assert err.strip() == f"batchpilot: error: {path}:task() raised KeyError: 'weights.pt'"


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="ref_batch: expected a positive integer"):
        main(["scale", "--ref-batch", "0", "--ref-lr", "0.1", "--batch", "8", "--debug"])


def test_help_explains_every_scale_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "scale", "--help")
    assert code == 0
    for option in (
        "--ref-batch",
        "--ref-lr",
        "--batch",
        "--micro-batch",
        "--accumulation",
        "--world-size",
        "--max-micro-batch",
        "--rule",
        "--reduction",
        "--beta1",
        "--beta2",
        "--eps",
        "--dataset-size",
        "--epochs",
        "--warmup-epochs",
        "--drop-last",
        "--format",
        "--debug",
    ):
        assert option in out, option
    code, out, _ = run(capsys)
    assert code == 0 and "scale" in out and "train" in out


def test_check_and_train_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "check", "--example", "digits", "--format", "json", "--device", "cpu"
    )
    assert code == 0 and json.loads(out)["has_batchnorm"] is True
    code, out, _err = run(capsys, "train", "--example", "xor4", "--steps", "40", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["steps"] == 40 and len(data["train_losses"]) == 40
    assert data["evaluations"][-1]["step"] == 40


def test_console_script_runs() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchpilot",
            "scale",
            "--ref-batch",
            "256",
            "--ref-lr",
            "0.1",
            "--batch",
            "8192",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["lr"] == pytest.approx(3.2)

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
        (
            ("tune", "--example", "xor4", "--target-loss", "-1"),
            "--target-loss: expected a positive number, got -1.0",
        ),
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


def test_examples_lists_what_each_task_file_builds(capsys: pytest.CaptureFixture[str]) -> None:
    from batchpilot.examples import EXAMPLE_INFO
    from batchpilot.loading import load_task

    code, out, _ = run(capsys, "examples", "--format", "json")
    assert code == 0
    listed = {row["name"]: row for row in json.loads(out)["examples"]}
    assert listed.keys() == EXAMPLE_INFO.keys()
    for name, row in listed.items():  # the registry cannot drift from the task files
        task = load_task(example=name)
        assert row == {
            "name": name,
            "spec": EXAMPLE_INFO[name].spec,
            "train_size": task.train_size,
            "val_size": task.val_size,
            "reference_batch": task.reference_batch,
            "reference_lr": task.reference_lr,
        }


def test_flags_render_as_flags_and_take_no_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    code, out, _ = run(capsys, "tune", "--help")
    assert code == 0
    assert "--verify" in out and "--no-verify" in out and "<bool>" not in out
    # help text in brackets is text, not markup that vanishes
    assert "[default: the task's reference batch, else 32]" in out
    code, _, err = run(capsys, "tune", "--verify", "yes")
    assert code == 2
    assert err.strip().splitlines() == [
        "batchpilot: error: TASK: 'yes' is not a task; a flag takes no value "
        "(write --verify, not --verify yes)"
    ]


def test_train_batch_is_global_and_micro_batch_per_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ("train", "--example", "xor4", "--steps", "1", "--format", "json", "--device", "cpu")
    for extra in (
        ("--batch", "8", "--accumulation", "2"),
        ("--batch", "8", "--micro-batch", "4"),
        ("--micro-batch", "4", "--accumulation", "2"),
    ):
        code, out, err = run(capsys, *base, *extra)
        assert code == 0, err
        data = json.loads(out)
        assert (data["global_batch"], data["micro_batch"], data["accumulation_steps"]) == (8, 4, 2)
    code, _, err = run(capsys, *base, "--batch", "8", "--micro-batch", "4", "--accumulation", "4")
    assert code == 2 and "--accumulation: 4 is not --batch / --micro-batch = 8 / 4 = 2" in err
    code, _, err = run(capsys, *base, "--batch", "9", "--accumulation", "2")
    assert code == 2 and "--accumulation: 2 does not divide --batch 9" in err


def test_an_old_option_name_still_works_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    args = ("memory", "--example", "xor4", "--device", "cpu", "--format", "json")
    code, out, err = run(capsys, *args, "--max-batch", "8")
    assert code == 0
    assert json.loads(out)["max_micro_batch"] == 8
    assert "note: --max-batch is now --max-micro-batch" in err
    code, _, err = run(capsys, *args, "--max-batch", "8", "--max-micro-batch", "8")
    assert code == 2 and "--max-batch: give --max-micro-batch only" in err

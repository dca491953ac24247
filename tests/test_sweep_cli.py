from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from batchpilot.cli import main
from batchpilot.plots.sweep import plot_loss_curves, plot_lr_vs_batch, plot_steps_to_target
from batchpilot.sweep import Budget, Grid, LrPlan, run_sweep

TASK = f"{Path(__file__).parent / 'sweep_task.py'}:task"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def test_sweep_runs_shows_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "s.sqlite"
    args = [
        "sweep",
        TASK,
        "--start",
        "32",
        "--budget-epochs",
        "2",
        "--target-loss",
        "0.4",
        "--evals",
        "4",
        "--lr-rule",
        "sqrt",
        "--objective",
        "val_loss",
        "--store",
        str(store),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "plots"),
        "--format",
        "json",
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    data = json.loads(out)
    assert {"trials", "best", "fit"} <= set(data)
    assert [t["batch"] for t in data["trials"]][:3] == sorted(
        t["batch"] for t in data["trials"][:3]
    )
    assert data["sweep"]["strategy"]["start"] == 32 and data["sweep"]["lr"]["rule"] == "sqrt"
    assert data["best"]["val_loss"]["batch"] == data["sweep"]["best_batch"]
    assert data["fit"]["steps_to_target"]["formula"] == "S = S_min (1 + B_crit / B)"
    assert len(data["plots"]) == 5 and all(Path(p).stat().st_size > 0 for p in data["plots"])
    assert "committed to" in err and "batch 32 (ran)" in err

    # The same command again is refused; with --resume it reads every trial back.
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "batchpilot: error: --resume: the store" in err
    code, out, err = run_cli(["sweep", "run", *args[1:], "--resume"], capsys)
    assert code == 0 and json.loads(out)["sweep"]["ran"] == 0 and "(stored)" in err

    code, out, _ = run_cli(["sweep", "show", str(store), "--format", "json"], capsys)
    shown = json.loads(out)["sweeps"]
    assert len(shown) == 1 and [t["key"] for t in shown[0]["trials"]] == [
        t["key"] for t in data["trials"]
    ]
    code, out, _ = run_cli(["sweep", "show", str(store)], capsys)
    assert code == 0 and "best batch per objective" in out and "S_min" in out


def test_grid_with_an_lr_grid_in_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        [
            "sweep",
            TASK,
            "--strategy",
            "grid",
            "--batches",
            "16,64",
            "--lr-rule",
            "grid",
            "--lr-grid",
            "0.5,2",
            "--budget-samples",
            "256",
            "--store",
            str(tmp_path / "s.sqlite"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "4 trials" in out and "best lr ∝ B^" in out and "1 = the linear rule held" in out


def test_default_grid_stays_inside_the_training_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        [
            *("sweep", TASK, "--strategy", "grid", "--budget-samples", "256", "--evals", "1"),
            *("--store", str(tmp_path / "s.sqlite"), "--device", "cpu", "--format", "json"),
        ],
        capsys,
    )
    assert code == 0, err
    # start 128: powers of two from 16 to 1024, capped at the 256 training samples
    assert [t["batch"] for t in json.loads(out)["trials"]] == [16, 32, 64, 128, 256]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget-epochs", "1", "--budget-samples", "9"], "--budget-epochs: give either"),
        (["--strategy", "random"], "--strategy: expected ladder or grid, got 'random'"),
        (["--batches", "8,16"], "--batches: only with --strategy grid"),
        (["--strategy", "grid", "--batches", "8,x"], "--batches: expected whole numbers"),
        (["--factor", "0.5"], "--factor: expected a number > 1, got 0.5"),
        (["--lr-rule", "cubic"], "--lr-rule: unknown rule 'cubic'"),
        (["--objective", "steps_to_target"], "--objective: 'steps_to_target' needs a target"),
        (["--start", "1024"], "--start: 1024 is larger than the training set (256 samples)"),
        (["--executor", "slurm"], "--executor: unknown executor 'slurm'"),
    ],
)
def test_bad_options_name_the_option(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["sweep", TASK, "--store", str(tmp_path / "s.sqlite"), *extra], capsys)
    assert code == 2 and message in err, err


def test_show_of_a_missing_store(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(["sweep", "show", str(tmp_path / "none.sqlite")], capsys)
    assert code == 2 and "STORE: no such file" in err


def test_plots_draw_one_line_per_batch() -> None:
    result = run_sweep(
        TASK,
        budget=Budget.equal_epochs(2, evals=3, target_loss=0.5),
        strategy=Grid((16, 32, 64)),
        lr=LrPlan(factors=(0.5, 1.0)),
        objective="val_loss",
    )
    ax = plot_loss_curves(result, x="samples")
    assert len(ax.get_lines()) == 3 + 1  # one per batch, and the target
    assert ax.get_xscale() == "log"
    ax = plot_steps_to_target(result)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    fit_line = ax.get_lines()[0]
    assert len(fit_line.get_xdata()) == 100
    ax = plot_lr_vs_batch(result)
    assert len(ax.collections) == 2  # every lr tried, and the best per batch
    plt.close("all")

"""``batchpilot demo NAME``: run one of the seed demonstrations, print what it reproduced, plot it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from batchpilot.cli._text import plain
from batchpilot.cli.app import (
    FormatOpt,
    OutputFormat,
    SeedOpt,
    check_out_folder,
    command_app,
    emit,
    stderr,
)
from batchpilot.demos import DEMOS, DemoResult, list_demos, run_demo
from batchpilot.errors import BadInputError
from batchpilot.jsonio import to_json

DEFAULT_OUT = Path("batchpilot-demos")


commands = command_app()


@commands.command(
    "demo",
    help=(
        "Run a demonstration of what practitioners' guides claim and say whether it reproduced: "
        f"{', '.join(DEMOS)}. Writes demo-NAME.png and demo-NAME.json to --out. "
        "Example: batchpilot demo xor  (batchpilot demo --list shows them all)"
    ),
)
def demo_command(
    name: Annotated[
        str | None,
        typer.Argument(metavar="NAME", help=f"Which demo: {', '.join(DEMOS)}.", show_default=False),
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="List the demos and the claims they test, then exit.")
    ] = False,
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for the plot (demo-NAME.png) and the result (demo-NAME.json)."
        ),
    ] = DEFAULT_OUT,
    plot: Annotated[
        bool, typer.Option("--plot/--no-plot", help="Write the plot and the JSON file to --out.")
    ] = True,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="A shorter run (seconds; used by the tests), same comparison."
        ),
    ] = False,
    seed: SeedOpt = 0,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    if list_only or name is None:
        if name is None and not list_only:
            raise BadInputError(f"NAME: give a demo to run ({', '.join(DEMOS)}) or --list")
        demos = [demo.to_dict() for demo in list_demos()]
        emit(fmt, {"demos": demos}, _render_list)
        return
    if name not in DEMOS:
        raise BadInputError(f"NAME: unknown demo {name!r}; choose one of {', '.join(DEMOS)}")
    if plot:
        check_out_folder(out)
    with stderr().status(f"running demo {name}{' (quick)' if quick else ''}…"):
        result = run_demo(name, seed=seed, quick=quick)
    files: dict[str, str | None] = {"plot": None, "json": None}
    if plot:
        files = write_outputs(result, out)
    emit(fmt, {**result.to_dict(), **files}, lambda console: _render(console, result, files))


def write_outputs(result: DemoResult, folder: Path) -> dict[str, str | None]:
    """Write ``demo-NAME.png`` and ``demo-NAME.json`` into ``folder``; returns their paths."""
    import matplotlib.pyplot as plt

    from batchpilot.plots import save_figure
    from batchpilot.plots.demos import plot_demo

    figure = plot_demo(result)
    png = save_figure(figure, folder / f"demo-{result.name}.png")
    plt.close(figure)
    path = folder / f"demo-{result.name}.json"
    path.write_text(to_json(result.to_dict(), indent=2) + "\n")
    return {"plot": str(png), "json": str(path)}


def _render_list(console: Console) -> None:
    table = Table(title="seed demonstrations (batchpilot demo NAME)")
    table.add_column("NAME")
    table.add_column("what it runs")
    table.add_column("source")
    for demo in list_demos():
        table.add_row(demo.name, demo.summary, demo.source)
    console.print(table)


def _render(console: Console, result: DemoResult, files: dict[str, str | None]) -> None:
    console.print(f"[bold]demo {result.name}[/bold] — {result.source}")
    console.print(f"The seed says: {result.claim}")
    rows = result.rows()
    table = Table(title=f"measured (seed {result.seed}{', quick' if result.quick else ''})")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == rows[0][0] else "right")
    for row in rows[1:]:
        table.add_row(*row)
    console.print(table)
    findings = Table(title="each part of the claim")
    findings.add_column("the seed says")
    findings.add_column("measured")
    findings.add_column("holds", justify="center")
    for finding in result.findings:
        findings.add_row(
            finding.claim,
            finding.measured,
            "[green]yes[/green]" if finding.holds else "[red]no[/red]",
        )
    console.print(findings)
    console.print(f"[bold]Verdict:[/bold] {result.verdict} ({result.seconds:.1f} s of training)")
    if files.get("plot"):
        console.print(f"plot: {plain(files['plot'])}   result: {plain(files['json'])}")

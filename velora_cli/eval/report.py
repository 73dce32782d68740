"""What `velora eval --mmlu` prints at the end: accuracy per category and overall."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_mmlu_results(result: dict[str, Any], console: Console | None = None) -> None:
    """The category table. Each subject's figure is printed once, as it finishes (eval.command). The model goes
    on a line of its own above: in the title it would wrap the title to the table's width, mid-phrase."""
    console = console or Console()
    console.print(f"model: {result['model']}", highlight=False, soft_wrap=True)
    table = Table(title=f"MMLU {result['shots']}-shot {result['split']} accuracy")
    table.add_column("category")
    table.add_column("questions", justify="right")
    table.add_column("accuracy", justify="right")
    for name, row in result["categories"].items():
        table.add_row(name, str(row["n"]), f"{100 * row['acc']:.1f}%")
    overall = result["overall"]
    table.add_row("overall", str(overall["n"]), f"{100 * overall['acc']:.1f}%", style="bold")
    console.print(table)

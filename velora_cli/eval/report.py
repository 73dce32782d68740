"""What `velora eval --mmlu` prints: accuracy per category and overall."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_mmlu_results(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    if len(result["subjects"]) <= 12:
        table = Table(title="MMLU by subject")
        for column in ("subject", "category", "n", "accuracy"):
            table.add_column(column, justify="right" if column in ("n", "accuracy") else "left")
        for name, row in result["subjects"].items():
            table.add_row(name, row["category"], str(row["n"]), f"{100 * row['acc']:.1f}%")
        console.print(table)
    title = f"MMLU {result['shots']}-shot {result['split']} accuracy: {result['model']}"
    table = Table(title=title)
    table.add_column("category")
    table.add_column("questions", justify="right")
    table.add_column("accuracy", justify="right")
    for name, row in result["categories"].items():
        table.add_row(name, str(row["n"]), f"{100 * row['acc']:.1f}%")
    overall = result["overall"]
    table.add_row("overall", str(overall["n"]), f"{100 * overall['acc']:.1f}%", style="bold")
    console.print(table)

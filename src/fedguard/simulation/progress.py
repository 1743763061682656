"""Progress display: rounds and client steps with elapsed time and ETA (rich)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    def __init__(self, total_rounds: int, disable: bool = False):
        self.console = Console(stderr=True, quiet=disable)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=disable or not sys.stderr.isatty(), transient=False,
        )
        self.rounds = self.progress.add_task("rounds", total=total_rounds, info="")
        self.steps = self.progress.add_task("client steps", total=1, info="", visible=False)

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def status(self, text: str) -> None:
        self.progress.update(self.rounds, info=text)

    def start_round(self, server_round: int, total_steps: int) -> None:
        self.progress.update(self.rounds, completed=server_round - 1)
        self.progress.reset(self.steps, total=total_steps, visible=True, info="")

    def step(self, step: int, loss: float) -> None:
        self.progress.update(self.steps, advance=1, info=f"loss {loss:.3f}")

    def end_round(self) -> None:
        self.progress.advance(self.rounds)

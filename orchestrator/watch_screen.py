"""`orchestrator watch` on a terminal: the frame of orchestrator/watch.py drawn by rich (Live display, progress
bars). The text of each line, and what a narrow terminal drops, is decided there; this module only draws it."""

from __future__ import annotations

from typing import TextIO

from orchestrator.watch import BarLine, JobView, frame_lines


def rich_frame(view: JobView, rates: dict[int, float | None], width: int = 80, max_shards: int = 12):
    """The same frame as a rich renderable: the bars are rich progress bars, the text is the plain frame's."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    rows = []
    for line in frame_lines(view, rates, width, max_shards):
        if not isinstance(line, BarLine):
            rows.append(Text(line, no_wrap=True, overflow="ellipsis"))
            continue
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(width=line.bar_cells + 2)  # the plain bar's cells and brackets: the same layout
        grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(Text(line.head), ProgressBar(total=1.0, completed=max(0.0, min(1.0, line.fraction)),
                                                  width=line.bar_cells + 2), Text(line.tail))
        rows.append(grid)
    return Group(*rows)


class Screen:
    """Redraws the frame in place on a terminal: rich's Live display (cursor hidden while it runs)."""

    def __init__(self, out: TextIO, width: int | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        # width None: rich follows the terminal (resizes included); a given width is kept (tests, fixed layouts)
        self.console = Console(file=out, force_terminal=True, width=width, soft_wrap=False, highlight=False)
        self.live = Live(console=self.console, auto_refresh=False, transient=False, redirect_stdout=False,
                         redirect_stderr=False)
        self.live.start()

    @property
    def width(self) -> int:
        return self.console.width

    def draw(self, frame) -> None:
        """Replace the previous frame with `frame` (a rich renderable)."""
        self.live.update(frame, refresh=True)

    def close(self) -> None:
        """Leave the last frame on screen and show the cursor again."""
        self.live.stop()

"""Progress of the long builds (the Verilated model, the Verilog export), one stage at a time.

On a terminal each stage is a live tqdm line with its elapsed time, and a bar where the stage can count its
work (the C++ compile counts object files); elsewhere (logs, CI, pipes) each stage prints one line when it
starts and one when it ends. tqdm is imported only when a terminal shows the bar.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

__all__ = ["Stages"]

#: Seconds between two looks at a stage's count (and two refreshes of its elapsed time).
POLL_S = 0.5


class Stages:
    """The stages of one build, reported under one *title*.

    Parameters
    ----------
    title : str
        What is being built, e.g. ``"RTL model (tiny)"``.
    file : text stream, optional
        Where to report (default: stderr).
    live : bool, optional
        Draw live tqdm lines; by default only when *file* is a terminal.
    """

    def __init__(self, title: str, file=None, live: bool | None = None):
        self.title = title
        self.file = file if file is not None else sys.stderr
        self.live = self.file.isatty() if live is None else live

    @contextmanager
    def stage(self, name: str, count: Callable[[], tuple[int, int] | None] | None = None):
        """Report the work done inside the ``with`` block as stage *name*.

        *count*, if given, is polled every :data:`POLL_S` seconds for ``(done, total)`` (or None while it
        cannot tell yet) and draws a bar.
        """
        desc = f"{self.title}: {name}"
        t0 = time.perf_counter()
        if not self.live:
            print(f"{desc} ...", file=self.file, flush=True)
            yield
            print(f"{desc} done in {time.perf_counter() - t0:.1f} s", file=self.file, flush=True)
            return
        from tqdm import tqdm

        # a pseudo-terminal may report 0 columns and 0 rows, which tqdm takes literally (and then draws nothing)
        size = shutil.get_terminal_size()
        bar = tqdm(desc=desc, total=None, file=self.file, leave=True, ncols=min(size.columns or 80, 100),
                   nrows=size.lines or 24, bar_format="{desc} [{elapsed}]")
        stop = threading.Event()

        def watch():
            while not stop.wait(POLL_S):
                seen = count() if count is not None else None
                if seen is not None:
                    done, total = seen
                    if bar.total != total:
                        bar.total = total
                        bar.bar_format = "{desc} {bar} {n}/{total} [{elapsed}]"
                    bar.n = min(done, total)
                bar.refresh()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
            if count is not None and (seen := count()) is not None:
                bar.total, bar.n = seen[1], min(seen)
            bar.refresh()
            bar.close()

"""Progress on the console (command line only): a tqdm bar over the channels of the nights
on a terminal, plain timestamped log lines otherwise (cron), one summary line per night."""

from __future__ import annotations

import logging
import sys

from .runner import Progress
from .summary import NightSummary

log = logging.getLogger("panacea.progress")


class ConsoleProgress(Progress):
    """Progress over ``ndates`` nights of ``nchannels`` channels each."""

    def __init__(self, ndates: int, nchannels: int, stream=None):
        self.total = ndates * nchannels
        self.ndates = ndates
        self.done = 0
        self.nights = 0
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if stream.isatty() and self.total > 1:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="channel", file=stream, leave=True,
                            dynamic_ncols=True)

    def channel_done(self, date: str, channel: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(f"{date} {channel}")
            self.bar.update(1)
        else:
            log.info("progress: %s %s done (%d/%d channels)", date, channel, self.done,
                     self.total)

    def night_done(self, date: str, code: int, summary: NightSummary) -> None:
        self.nights += 1
        if self.ndates > 1:
            log.info("progress: %d/%d nights done", self.nights, self.ndates)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

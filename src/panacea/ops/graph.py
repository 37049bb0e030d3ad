"""A small task scheduler: tasks become ready when their inputs are done (the caller adds
them then, from the callback of the task they depend on) and go to the engine in priority
order, longest expected remaining path first, at most ``engine.slots`` at a time.

Holding the ready tasks here rather than in the engine's queue is what lets a late, urgent
task (the science of the channel whose calibration finished last) overtake small ones
queued earlier, so that the workers finish together.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(order=True)
class Task:
    """One task: ``fn(*args)`` on the engine, then ``done(result)`` (or ``failed(error)``
    when it raised) here, in the scheduling process.

    Attributes
    ----------
    order : tuple
        Sort key, smallest first (the scheduler puts the negated expected remaining path,
        in seconds, first).
    """

    order: tuple
    seq: int = field(default=0)
    fn: Callable = field(default=None, compare=False)
    args: tuple = field(default=(), compare=False)
    done: Callable[[Any], None] = field(default=None, compare=False)
    failed: Callable[[BaseException], None] = field(default=None, compare=False)


class Scheduler:
    """Runs tasks on ``engine`` (see :mod:`.executors`) until none is ready or running."""

    def __init__(self, engine):
        self.engine = engine
        self._ready: list[Task] = []
        self._running: dict = {}
        self._seq = itertools.count()

    def add(self, order: tuple, fn: Callable, args: tuple, done: Callable[[Any], None],
            failed: Callable[[BaseException], None]) -> None:
        """Make a task ready (its inputs are done)."""
        heapq.heappush(self._ready, Task(order, next(self._seq), fn, args, done, failed))

    def run(self) -> None:
        """Submit ready tasks by priority, hand each result to its callback, until done."""
        while self._ready or self._running:
            while self._ready and len(self._running) < self.engine.slots:
                task = heapq.heappop(self._ready)
                self._running[self.engine.submit(task.fn, *task.args,
                                                 priority=-int(task.order[0]))] = task
            for future in self.engine.wait(list(self._running)):
                task = self._running.pop(future)
                try:
                    value = self.engine.result(future)
                except Exception as err:  # the task's error: its callback decides
                    task.failed(err)
                    continue
                task.done(value)

"""A small task scheduler: tasks become ready when their inputs are done (the caller adds
them then, from the callback of the task they depend on) and go to the engine in priority
order, longest expected remaining path first, at most ``engine.slots`` at a time.

Holding the ready tasks here rather than in the engine's queue is what lets a late, urgent
task (the science of the channel whose calibration finished last) overtake small ones
queued earlier, so that the workers finish together.

Work of the scheduling process itself that no task waits for (reading the guider frames
ahead of the science tasks, joining the channels while the QA tasks run) is queued with
:meth:`Scheduler.background` and done while the workers compute, one job at a time between
looks at the running tasks, instead of in a callback while a worker has nothing to do.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
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
        self._background: deque[Callable[[], None]] = deque()

    def add(self, order: tuple, fn: Callable, args: tuple, done: Callable[[Any], None],
            failed: Callable[[BaseException], None]) -> None:
        """Make a task ready (its inputs are done)."""
        heapq.heappush(self._ready, Task(order, next(self._seq), fn, args, done, failed))

    def background(self, job: Callable[[], None]) -> None:
        """Queue ``job()`` to run in this process while the engine's tasks run (keep each
        job short, ~0.1 s: a task that ends meanwhile waits for it to hand its result).
        A job must handle its own errors; one that raises is logged and dropped."""
        self._background.append(job)

    def _run_background(self) -> None:
        job = self._background.popleft()
        try:
            job()
        except Exception as err:  # an optimisation only: whoever needs it redoes it
            log.warning("a background job failed (its work is redone where it is needed): "
                        "%s: %s", type(err).__name__, err, exc_info=log.isEnabledFor(10))

    def run(self) -> None:
        """Submit ready tasks by priority, hand each result to its callback, until done;
        the background jobs run while tasks are in flight (or when none is left)."""
        while self._ready or self._running or self._background:
            while self._ready and len(self._running) < self.engine.slots:
                task = heapq.heappop(self._ready)
                self._running[self.engine.submit(task.fn, *task.args,
                                                 priority=-int(task.order[0]))] = task
            if self._background:
                self._run_background()
                finished = [f for f in self._running if f.done()]
            else:
                finished = self.engine.wait(list(self._running))
            for future in finished:
                task = self._running.pop(future)
                try:
                    value = self.engine.result(future)
                except Exception as err:  # the task's error: its callback decides
                    task.failed(err)
                    continue
                task.done(value)

"""The night as a task graph: scheduling order, dependencies, and the local pool's
per-(exposure, channel) tasks giving the serial products bit for bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
from astropy.io import fits

from panacea.allocator import release_freed_memory
from panacea.cli import main
from panacea.ops.executors import Inline, LocalPool
from panacea.ops.graph import Scheduler
from panacea.ops.summary import night_folder


def _record(name: str, order: list) -> str:
    order.append(name)
    return name


def _fail() -> None:
    raise ZeroDivisionError("in a task")


def test_scheduler_runs_a_task_once_its_inputs_are_done_longest_first():
    ran: list[str] = []
    got: dict = {}
    scheduler = Scheduler(Inline())

    def then(value):  # "cal" done: its dependent becomes ready, the longest of the rest
        got["cal"] = value
        scheduler.add((-30.0,), _record, ("science", ran), got.setdefault, lambda e: None)

    scheduler.add((-20.0,), _record, ("cal", ran), then, lambda e: None)
    scheduler.add((-5.0,), _record, ("qa", ran), lambda v: None, lambda e: None)
    scheduler.add((-10.0,), _fail, (), lambda v: None, lambda e: got.setdefault("err", e))
    scheduler.run()
    assert ran == ["cal", "science", "qa"]  # the failing task ran between them
    assert got["cal"] == "cal" and isinstance(got["err"], ZeroDivisionError)


def test_local_pool_returns_results_and_errors_of_tasks():
    with LocalPool(2) as engine:
        scheduler = Scheduler(engine)
        out: dict = {}
        for i in range(3):
            scheduler.add((-float(i),), pow, (i, 2), lambda v, i=i: out.__setitem__(i, v),
                          lambda e: None)
        scheduler.add((0.0,), _fail, (), lambda v: None, lambda e: out.setdefault("err", e))
        scheduler.run()
    assert out[0] == 0 and out[1] == 1 and out[2] == 4
    assert isinstance(out["err"], ZeroDivisionError)
    assert release_freed_memory() in (True, False)


def _science(x):
    return x


_science.keeps_freed_memory = True


def test_a_worker_keeps_freed_memory_only_between_science_tasks(monkeypatch):
    """Freed memory is given back after every task but a science task, and before a task of
    another kind once a science task kept it."""
    from panacea.ops import executors

    calls: list[str] = []
    monkeypatch.setattr(executors, "release_freed_memory", lambda: calls.append("release"))
    monkeypatch.setattr(executors, "_kept_for", None)
    for fn in (abs, _science, _science, abs, _science):
        calls.append(fn.__name__)
        assert executors.trimmed_task(fn, -1) in (1, -1)
    assert calls == ["abs", "release", "_science", "_science", "abs", "release", "release",
                     "_science"]
    assert executors._kept_for is _science


def _differs(p, q) -> list[str]:
    """The HDUs of FITS file ``p`` whose data are not bit-identical in ``q``."""
    bad = []
    with fits.open(p) as x, fits.open(q) as y:
        if len(x) != len(y):
            return [q.name]
        for u, v in zip(x, y):
            if u.data is None or v.data is None:
                if (u.data is None) != (v.data is None):
                    bad.append(f"{q.name}[{u.name}]")
                continue
            if isinstance(u, fits.BinTableHDU):
                same = all(np.array_equal(u.data[c], v.data[c],
                                          equal_nan=u.data[c].dtype.kind == "f")
                           for c in u.columns.names)
            else:
                same = np.array_equal(u.data, v.data, equal_nan=True)
            if not same:
                bad.append(f"{q.name}[{u.name}]")
    return bad


def test_pool_tasks_per_exposure_give_the_serial_products(reduced, sim_night, tmp_path):
    """One channel on a local pool of 2 (its calibration reused from the serial run): the
    response task and one science task per exposure run in the two workers, and every
    product equals the serial run's bit for bit; the summary keeps the fixed order."""
    out = tmp_path / "pool"
    (out / "CALS").mkdir(parents=True)
    shutil.copy2(reduced / "CALS" / f"cal_{sim_night.date}_uv.fits", out / "CALS")
    rc = main(["-d", sim_night.date, "-s", "uv", "--baseraw", str(sim_night.baseraw),
               "--output", str(out), "--jobs", "2"])
    assert rc == 0
    night = night_folder(out, sim_night.date)
    summary = json.loads((night / "summary.json").read_text())
    kinds = [(o["kind"], o["status"]) for o in summary["outcomes"]]
    assert kinds[:2] == [("calibration", "up-to-date"), ("response", "written")]
    science = [o for o in summary["outcomes"] if o["kind"] == "science"]
    assert len(science) == 3 and all(o["status"] == "written" for o in science)
    log = (night / f"panacea_{sim_night.date}.log").read_text()
    assert log.count("task science_task") == 2  # the third: the standard, in its response
    assert "task response_task" in log and "peak RSS" in log
    products = [p for p in out.rglob("*.fits") if not p.name.startswith("joined_")]
    assert len(products) >= 8  # calibration, response, 3 exposures' products
    # the serial run reduced all four channels; uv's files are compared
    bad = [b for p in products for b in _differs(p, reduced / p.relative_to(out))]
    assert bad == []


def test_background_jobs_run_while_tasks_are_in_flight():
    """Jobs of the scheduling process run between looks at the running tasks; one that
    fails is dropped, the tasks and the other jobs go on."""
    done: list = []
    with LocalPool(2) as engine:
        scheduler = Scheduler(engine)

        def then(value):
            done.append(value)
            if value == 1:  # a task's callback may queue a job
                scheduler.background(lambda: done.append("late job"))

        for i in range(3):
            scheduler.add((-float(i),), pow, (i, 1), then, lambda e: None)
        scheduler.background(lambda: done.append("job"))
        scheduler.background(_fail)
        scheduler.run()
    assert sorted(v for v in done if isinstance(v, int)) == [0, 1, 2]
    assert "job" in done and "late job" in done
    assert done.index("job") < done.index("late job")



_PROBE = """
from numba import njit


@njit(cache=True)
def twice(x):
    return 2.0 * x
"""


def test_numba_functions_preloaded_from_the_cache(tmp_path):
    """The parent loads the cached machine code of the numba functions before the pool
    forks (none compiled there); a call then finds it, and so does a jitted caller compiled
    afterwards (the implementation is registered as numba's own cache hit does)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import panacea

    (tmp_path / "nbprobe.py").write_text(_PROBE)
    src = str(Path(panacea.__file__).parents[1])  # this checkout's panacea
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), src])}
    fill = "import nbprobe; nbprobe.twice(1.0)"  # compiles once, writes numba's cache
    check = ("import nbprobe; from panacea.ops.executors import preload_compiled\n"
             "n = preload_compiled([nbprobe]); sigs = list(nbprobe.twice.overloads)\n"
             "assert nbprobe.twice(2.0) == 4.0\n"
             "from numba import njit\n"  # a jitted caller compiled after the preload
             "caller = njit(lambda x: nbprobe.twice(x) + 1.0)\n"
             "assert caller(2.0) == 5.0\n"
             "print(n, len(sigs), len(nbprobe.twice.overloads), preload_compiled([nbprobe]))")
    subprocess.run([sys.executable, "-c", fill], check=True, env=env, cwd=tmp_path)
    out = subprocess.run([sys.executable, "-c", check], check=True, env=env, cwd=tmp_path,
                         capture_output=True, text=True).stdout.split()
    # one overload loaded, the call used it (no second one), nothing left to load after
    assert out == ["1", "1", "1", "0"]

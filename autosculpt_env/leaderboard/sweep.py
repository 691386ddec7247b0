"""Running every missing row: a local process pool (the default) or Ray.

A sweep lists the (task, agent, seed) rows its rows folder lacks and runs each one
(:func:`autosculpt_env.leaderboard.run.run_one`), writing its row the moment it is done.
Both backends give the same guarantees:

* **atomic rows**: a row file appears whole or not at all (temporary file, then a hard link
  that never replaces an existing row), so a killed sweep leaves no half-written row and no
  row is ever written twice;
* **resumable**: rows already present are skipped, so running the same command again
  finishes a killed sweep with no row lost or written twice (a Ray task of a killed driver
  may still finish its row during the next run: the first row written is kept);
* **one runner per folder**: the rows and work folders are locked (``flock``) for the whole
  sweep; a second runner stops with a clear error instead of computing every row twice;
* **runs die with their runner**: agents get ``PR_SET_PDEATHSIG``; a local pool's workers
  too; a local Ray instance started by the sweep shares the runner's fate, and a cluster
  ends the tasks of a driver that went away;
* **runs in parts**: with a time budget (``time_budget``, ``--time-budget 2h``) no row starts
  once the budget is spent, counted from the first row's start; the rows running then
  finish and are written, so a sitting ends without losing work, and the same command
  continues the sweep.

``backend="ray"`` submits each (task, agent, seed) as one Ray task asking for
``protocol.threads`` CPUs (and ``protocol.gpus`` GPUs), to a running cluster (``address``,
e.g. ``"auto"`` or ``"ray://head:10001"``) or to a local instance it starts. Every node must
have the package installed and see the rows and work folders at the same paths (a shared
file system); the driver makes them absolute.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from .agents import AGENTS, find_agent
from .protocol import Protocol, Task, check_task, row_id
from .rows import check_folder, write_row
from .run import ROW_SCHEMA, AgentError, die_with_parent, run_one

BACKENDS = ("local", "ray")


class FolderLock:
    """An exclusive ``flock`` on a folder, held by one runner for its whole run.

    A second runner on the same rows folder or work folder would compute every row twice,
    mix its progress curves into the first one's run folders and delete its half-written
    rows; it stops instead, with a clear error. The lock is on the folder itself (no lock
    file), and the kernel drops it when the holder dies, so a killed runner leaves nothing
    stale behind.
    """

    def __init__(self, folder: str | os.PathLike, what: str, option: str):
        self.folder, self.what, self.option = Path(folder), what, option
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        import fcntl

        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{self.what} {self.folder} is in use by another leaderboard runner; wait for "
                f"it to finish (then run again to resume) or pass another {self.option}"
            ) from None
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def check_writable(folder: str | os.PathLike, what: str, option: str) -> None:
    """Create ``folder`` and a file in it, or raise a ``ValueError`` saying so, before any
    search or fine-tuning is spent on rows that could not be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"{what} {folder} is not writable ({e.strerror or e}); fix its permissions or "
            f"pass another {option}. Nothing was run."
        ) from None


def search_rewards(protocol: Protocol, tasks: Sequence[Task]) -> dict | None:
    """``{task name: surrogate identity}`` when the search reward is a fitted proxy (building
    each task's env once), else ``None``."""
    if protocol.evaluation != "proxy":
        return None
    import gymnasium as gym

    from .protocol import task_dataset, task_env_kwargs
    from .run import search_reward_identity

    out = {}
    for task in tasks:
        env = gym.make(
            task.env_id,
            dataset=task_dataset(task, protocol),
            evaluation=protocol.evaluation,
            target_flops_reduction=task.target_flops_reduction,
            reward_samples=task_env_kwargs(task, protocol)["reward_samples"],
        )
        try:
            out[task.name] = search_reward_identity(env)
        finally:
            env.close()
    return out


class TimeBudget:
    """Whether another row may start: always without a budget; with one, until ``seconds``
    have passed since the first row started (rows already running always finish)."""

    def __init__(self, seconds: float | None = None):
        if seconds is not None and not seconds > 0:
            raise ValueError(f"a time budget must be a positive number of seconds, got {seconds}")
        self.seconds, self.start = seconds, None

    def admits(self) -> bool:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        return self.seconds is None or now - self.start < self.seconds


def parse_duration(text: str) -> float:
    """argparse type: seconds from ``"90"``, ``"90s"``, ``"45m"`` or ``"2h"`` (> 0)."""
    import argparse

    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 3600, 90m or 2h, got {text!r}"
        )
    return seconds


def run_and_write(job: tuple) -> tuple[str, str | None, float, bool]:
    """One row, run and written: ``(row id, error or None, seconds, written)``. Never
    raises: one broken run must not stop the sweep. The unit of work of every backend.

    ``written`` is ``False`` without an error when another run wrote the row first (e.g. a
    task of a killed Ray driver that was still finishing): that row is kept, never replaced.
    """
    task, agent, seed, protocol, workdir, rows_dir, agents_dirs = job
    rid = row_id(task, agent, seed)
    t0 = time.perf_counter()
    try:
        row = run_one(task, agent, seed, protocol, workdir, agents_dirs=agents_dirs)
    except AgentError as e:
        return rid, f"{e}", time.perf_counter() - t0, False
    except Exception as e:
        tb = "".join(traceback.format_exception(e)[-6:])
        return rid, f"{type(e).__name__}: {e}\n{tb}", time.perf_counter() - t0, False
    written = write_row(rows_dir, row, exclusive=True) is not None
    return rid, None, time.perf_counter() - t0, written


def run_all(
    protocol: Protocol,
    tasks: Sequence[Task],
    agents: Sequence[str] = AGENTS,
    rows_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    jobs: int = 1,
    progress: bool = True,
    backend: str = "local",
    address: str | None = None,
    agents_dirs: Sequence[str] = (),
    time_budget: float | None = None,
) -> dict:
    """Run every missing (task, agent, seed) row; resumable.

    Rows already in ``rows_dir`` are skipped. A failed run (e.g. a broken agent) writes no
    row, is reported, and does not stop the others.

    Args:
        rows_dir, workdir: the row files and the runs' folders (default: the track's,
            ``benchmarks/tracks/TRACK/rows`` and ``.../runs``).
        jobs: runs at a time (local backend; Ray schedules by the CPUs each task asks for).
        backend: ``"local"`` or ``"ray"``.
        address: the Ray cluster to join (``None``: start a local instance, or use the one
            this process already joined).
        agents_dirs: extra folders searched for agent scripts.
        time_budget: seconds after the first row's start past which no row starts (those
            running finish); ``None``: run every row.

    Returns:
        ``{"done": [...], "skipped": [...], "failed": {row id: error}, "left": [...]}``;
        ``left``: the rows not started because the time budget was spent.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    budget = TimeBudget(time_budget)  # refused before any folder is made
    from .cli import default_rows_dir, default_work_dir

    track = protocol.name or "custom"
    rows_dir = Path(rows_dir if rows_dir is not None else default_rows_dir(track)).resolve()
    workdir = Path(workdir if workdir is not None else default_work_dir(track)).resolve()
    check_writable(rows_dir, "rows folder", "--rows-dir")
    check_writable(workdir, "work folder", "--work-dir")
    with ExitStack() as locks:  # before anything is read, deleted or run
        locks.enter_context(FolderLock(rows_dir, "rows folder", "--rows-dir"))
        if workdir != rows_dir:
            locks.enter_context(FolderLock(workdir, "work folder", "--work-dir"))
        for task in tasks:
            check_task(task, protocol)
        check_folder(rows_dir, protocol, ROW_SCHEMA, search_rewards(protocol, tasks))
        for stale in rows_dir.glob(".*.tmp"):  # a row being written when a run was killed
            stale.unlink(missing_ok=True)
        for agent in agents:
            find_agent(agent, agents_dirs)
        todo, skipped = [], []
        for task in tasks:
            for agent in agents:
                for seed in protocol.seeds:
                    rid = row_id(task, agent, seed)
                    if (rows_dir / f"{rid}.json").exists():
                        skipped.append(rid)
                    else:
                        todo.append(
                            (task, agent, seed, protocol, workdir, rows_dir, tuple(agents_dirs))
                        )
        run = _run_ray if backend == "ray" else _run_local
        return run(todo, skipped, rows_dir, jobs, progress, address, budget)


def _reporter(todo, skipped, rows_dir, progress):
    from tqdm.auto import tqdm

    result = {"done": [], "skipped": skipped, "failed": {}, "left": []}
    bar = tqdm(total=len(todo), disable=not progress, unit="run", dynamic_ncols=True)
    if skipped:
        bar.write(f"resuming: {len(skipped)} rows exist in {rows_dir}, {len(todo)} to run")

    def report(rid, err, seconds, written=True):
        bar.update(1)
        if err is None and written:
            result["done"].append(rid)
            bar.write(f"  {rid}: {seconds:.0f}s")
        elif err is None:
            result["skipped"].append(rid)
            bar.write(f"  {rid}: written meanwhile by another run; kept that row")
        else:
            result["failed"][rid] = err
            bar.write(f"  {rid}: FAILED {err.splitlines()[0][:300]}")

    return result, bar, report


def _schedule(todo, window, budget, submit, next_done, report) -> list[str]:
    """Keep up to ``window`` rows running, started in the listed order while ``budget``
    admits them, and report each as it ends. ``submit(job)`` starts a row and returns its
    handle; ``next_done(running)`` waits for one, removes it from ``running`` (handle: row
    id) and returns its outcome. Returns the ids of the rows not started."""
    queue, running = list(reversed(todo)), {}  # popped from the end: the listed order
    while True:
        while queue and len(running) < window and budget.admits():
            job = queue.pop()
            running[submit(job)] = row_id(*job[:3])
        if not running:
            return [row_id(*job[:3]) for job in reversed(queue)]
        report(*next_done(running))


def _run_local(todo, skipped, rows_dir, jobs, progress, address, budget) -> dict:
    if address is not None:
        raise ValueError("--address is for --backend ray; the local backend runs here")
    result, bar, report = _reporter(todo, skipped, rows_dir, progress)
    if jobs <= 1:  # in this process, one row at a time: the handle is the row's outcome

        def run_here(job):
            bar.set_postfix_str(row_id(*job[:3]))
            return run_and_write(job)

        result["left"] = _schedule(
            todo, 1, budget, run_here, lambda running: running.popitem()[0], report
        )
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        def next_done(running):
            fut = next(as_completed(running))
            del running[fut]
            return fut.result()

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=die_with_parent
        ) as pool:
            result["left"] = _schedule(
                todo, jobs, budget, lambda job: pool.submit(run_and_write, job), next_done, report
            )
    bar.close()
    return result


def _run_ray(todo, skipped, rows_dir, jobs, progress, address, budget) -> dict:
    try:
        import ray
    except ImportError:
        raise ValueError(
            "--backend ray needs Ray: pip install 'autosculpt-env[ray]' (or pip install ray)"
        ) from None
    if not ray.is_initialized():
        options = {"include_dashboard": False, "log_to_driver": False}
        if address is None:
            options["num_cpus"] = max(1, jobs * (todo[0][3].threads if todo else 1))
        ray.init(address=address, **options)
    result, bar, report = _reporter(todo, skipped, rows_dir, progress)
    # without a budget every row is submitted at once (an autoscaling cluster sees them all);
    # with one, only as many as the cluster runs at a time, so the rest can still be held back
    window = max(1, len(todo))
    if budget.seconds is not None and todo:
        cpus = ray.cluster_resources().get("CPU", 1)
        window = max(1, int(cpus // max(1, todo[0][3].threads)))

    def submit(job):
        protocol = job[3]
        task = ray.remote(run_and_write).options(
            num_cpus=protocol.threads, num_gpus=protocol.gpus, max_retries=0
        )
        return task.remote(job)

    def next_done(running):
        [ref], _ = ray.wait(list(running), num_returns=1)
        rid = running.pop(ref)
        try:
            return ray.get(ref)
        except Exception as e:  # the worker died (killed, out of memory ...)
            return rid, f"{type(e).__name__}: {e}", 0.0, False

    result["left"] = _schedule(todo, window, budget, submit, next_done, report)
    bar.close()
    return result

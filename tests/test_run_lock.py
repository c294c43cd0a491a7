"""The MODEL_DIR lock cannot be held twice: many processes racing for a directory whose lock
file names a dead process (a scheduler restarting replicas after a crash).

The old lock read a stale file, removed it and wrote its own, so a second process that had read
the same stale file removed the first one's fresh lock: both ran (5 of 40 trials). The lock is
now the kernel's (`fcntl.flock`), which it grants to one process at a time.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time

from prompt_jax.storage import run_dir

TRIALS = 200
WORKERS = 4
HOLD_SECONDS = 0.005  # long enough for a second holder to overlap, short enough for 200 trials


def _dead_pid() -> int:
  """A pid that no process has: a finished child's."""
  child = multiprocessing.get_context("spawn").Process(target=int)
  child.start()
  child.join()
  return child.pid


def _race(model_dir, barrier, start_trial, results):
  """Per trial: wait for every worker, try the lock, and while holding it create a marker that
  only one holder at a time can create (O_EXCL). Reports (acquired, overlapped) per trial."""
  marker = os.path.join(model_dir, "holder")
  for _ in range(TRIALS):
    start_trial.wait()
    barrier.wait()
    lock = run_dir.RunLock(model_dir)
    acquired = overlapped = False
    try:
      lock.acquire()
      acquired = True
    except ValueError:
      pass
    if acquired:
      try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
      except FileExistsError:
        overlapped = True
      time.sleep(HOLD_SECONDS)
      if not overlapped:
        os.remove(marker)
      lock.release()
    results.put((acquired, overlapped))


def test_concurrent_takeovers_of_a_stale_lock_never_acquire_twice(tmp_path):
  model_dir = str(tmp_path / "run")
  os.makedirs(model_dir)
  stale = json.dumps({"pid": _dead_pid(), "host": os.uname().nodename, "started": 0.0})
  ctx = multiprocessing.get_context("spawn")
  barrier, start_trial, results = ctx.Barrier(WORKERS), ctx.Barrier(WORKERS + 1), ctx.Queue()
  workers = [ctx.Process(target=_race, args=(model_dir, barrier, start_trial, results))
             for _ in range(WORKERS)]
  for worker in workers:
    worker.start()
  acquired_per_trial, overlaps = [], 0
  try:
    for _ in range(TRIALS):
      with open(os.path.join(model_dir, run_dir.LOCK_NAME), "w") as f:
        f.write(stale)  # the crashed run's lock file, as a restarted replica finds it
      start_trial.wait(timeout=60)
      outcomes = [results.get(timeout=60) for _ in range(WORKERS)]
      acquired_per_trial.append(sum(a for a, _ in outcomes))
      overlaps += sum(o for _, o in outcomes)
  finally:
    for worker in workers:
      worker.join(timeout=60)
      if worker.is_alive():
        worker.kill()
  assert overlaps == 0, f"{overlaps} double acquisitions in {TRIALS} trials"
  # Every trial someone ran (a stale lock file never blocks), so the race above was real.
  assert min(acquired_per_trial) >= 1, acquired_per_trial


def test_a_refused_process_names_the_holder_and_changes_nothing(tmp_path):
  model_dir = tmp_path / "run"
  with run_dir.RunLock(str(model_dir)):
    lock_file = model_dir / run_dir.LOCK_NAME
    before = (lock_file.read_bytes(), lock_file.stat().st_mtime_ns)
    child = multiprocessing.get_context("spawn").Pool(1)
    try:
      message = child.apply(_try_lock, (str(model_dir),))
    finally:
      child.close()
      child.join()
    assert f"in use by process {os.getpid()} on host" in message, message
    assert (lock_file.read_bytes(), lock_file.stat().st_mtime_ns) == before
  assert not model_dir.exists()  # released, and the directory it created was empty


def _try_lock(model_dir: str) -> str:
  try:
    run_dir.RunLock(model_dir).acquire()
  except ValueError as e:
    return str(e)
  return "acquired"

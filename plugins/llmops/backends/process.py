"""A job's process, run the way both local twins need: its output streamed to the caller's log
and kept in a log file, a timeout, and its whole process group killed with it (or with us)."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmops.backends.training.job import TrainingJobError
from llmops.config import PROJECT_ROOT

TAIL_LINES = 60


def run_process(command: list[str], env: dict, log_path: Path, timeout_s: float, on_line, what: str) -> None:
    """Run a job's command in its own process group, stream its output to ``on_line`` and to
    ``log_path``, and raise ``TrainingJobError`` with the log's tail when it fails or times out."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        timer = threading.Timer(timeout_s, _kill_group, args=(process,))
        timer.start()
        started = time.monotonic()
        try:
            for raw in iter(process.stdout.readline, b""):
                log.write(raw)
                # tqdm redraws with carriage returns; keep the last state of each line.
                line = raw.decode("utf-8", errors="replace").rstrip("\n").rsplit("\r", 1)[-1]
                if line.strip():
                    tail.append(line)
                    on_line(line)
            code = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:
                _kill_group(process)
    elapsed = time.monotonic() - started
    if elapsed >= timeout_s and code != 0:
        raise TrainingJobError(
            f"{what} timed out after {timeout_s:.0f}s and was stopped; last output:\n" + "\n".join(tail)
        )
    if code != 0:
        raise TrainingJobError(f"{what} failed with exit code {code}; last output:\n" + "\n".join(tail))


def _die_with_parent() -> None:
    """In the child, before exec: if the launching process dies (a worker killed by the
    scheduler), the job gets SIGTERM instead of training on as an orphan. Linux only."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

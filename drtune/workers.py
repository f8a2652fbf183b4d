"""``drtune search --workers N [--gpus 0,1]``: several local worker processes on one study.

Each worker is a plain ``drtune search`` process with the same arguments; they share the study
through its storage, exactly as workers on different machines do. ``--gpus`` gives each worker
its own GPU through ``CUDA_VISIBLE_DEVICES`` (one process per GPU is TensorFlow's standard way).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Sequence

from absl import logging

from drtune.devices import GROWTH_ENV
from drtune.errors import InputError


def parse_gpus(text: str | None) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]``; each entry must be a device index. An index may repeat:
    ``0,0,1,1`` deals two workers to each GPU."""
    if not text:
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus):
        raise InputError(f"--gpus {text!r}: expected comma-separated device indices, e.g. 0,1")
    return gpus


def worker_envs(n: int, gpus: Sequence[str], base: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The environment of each of ``n`` workers; GPUs are dealt round-robin.

    ``DRTUNE_WORKER`` names each worker (TPE seeds derive from it): ``HOST/i``, or ``ID.i`` when
    the parent has ``DRTUNE_WORKER=ID`` — so workers differ across machines and are
    reproducible for a given host (or ID) and index.
    """
    if n < 1:
        raise InputError(f"--workers {n}: must be >= 1")
    base = dict(os.environ if base is None else base)
    prefix = f"{base['DRTUNE_WORKER']}." if base.get("DRTUNE_WORKER") else f"{socket.gethostname()}/"
    envs = []
    for i in range(n):
        env = dict(base, DRTUNE_WORKER=f"{prefix}{i}")
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            # Grow GPU memory as needed, so that `--gpus 0,0` (two workers on one GPU) works.
            env.setdefault(GROWTH_ENV, "true")
        envs.append(env)
    return envs


def strip_worker_flags(argv: Sequence[str]) -> list[str]:
    """The command line of one worker: the parent's, without ``--workers`` and ``--gpus``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--gpus"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--gpus=")):
            continue
        out.append(arg)
    return out


def _relay(proc: subprocess.Popen[str], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(f"{prefix} {line}")
    sys.stderr.flush()


def run_workers(argv: Sequence[str], n: int, gpus: Sequence[str]) -> int:
    """Start ``n`` ``drtune`` workers with ``argv``, relay their output, return the worst exit code."""
    cmd = [sys.executable, "-m", "drtune", *strip_worker_flags(argv)]
    procs: list[subprocess.Popen[str]] = []
    threads = []
    for i, env in enumerate(worker_envs(n, gpus)):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        gpu = f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if gpus else ""
        logging.info("worker %d: pid %d%s", i, proc.pid, gpu)
        t = threading.Thread(target=_relay, args=(proc, f"[w{i}]"), daemon=True)
        t.start()
        threads.append(t)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.send_signal(signal.SIGINT)
        codes = [p.wait() for p in procs]
    for t in threads:
        t.join(timeout=5)
    for i, code in enumerate(codes):
        if code:
            logging.error("worker %d exited with code %d", i, code)
    return max(codes, default=0)

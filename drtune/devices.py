"""The device that trains: GPUs shared between workers, and its name for the trial.

TensorFlow reserves nearly all of a GPU's memory when it first touches it, so a second process
on the same GPU (``drtune search --gpus 0,0,1,1``) would fail to allocate anything. Memory
growth makes each process take only what it uses; our small networks leave a GPU mostly idle,
which is when two or more workers per GPU pay. ``configure`` switches it on for every visible GPU
before TensorFlow initialises them (and through ``TF_FORCE_GPU_ALLOW_GROWTH`` for processes it
starts), and names the device, which trials record next to their worker.

Without a GPU all of this is a no-op and the name is ``cpu``: every code path runs on the CPU.
"""

from __future__ import annotations

import os

from absl import logging

GROWTH_ENV = "TF_FORCE_GPU_ALLOW_GROWTH"


def configure() -> str:
    """Memory growth on every visible GPU; the name of the device that will train."""
    os.environ.setdefault(GROWTH_ENV, "true")
    import tensorflow as tf  # deferred: keeps TensorFlow out of light commands' start-up

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            # Already initialised in this process (e.g. a second run in one process): the
            # setting cannot change any more, and the environment variable set it already.
            pass
    return device_name()


def device_name() -> str:
    """``cpu``, or the first visible GPU's model name (e.g. ``NVIDIA A100-SXM4-40GB``)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "cpu"
    try:
        details = tf.config.experimental.get_device_details(gpus[0])
    except (RuntimeError, ValueError) as exc:  # pragma: no cover - driver-dependent
        logging.warning("cannot read the details of %s: %s", gpus[0].name, exc)
        details = {}
    name = str(details.get("device_name") or gpus[0].name)
    return name if len(gpus) == 1 else f"{name} (+{len(gpus) - 1} more visible)"

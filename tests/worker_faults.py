"""Job bodies for the executors' fault tests, importable by worker processes (spawned or Ray's): each is
`run_job` with a fault in the first evaluation of the sweep, recorded in a marker file beside the output folder."""

import os
from pathlib import Path

from mixq.errors import MixqError
from mixq.sweep import jobs


def marker(root) -> Path:
    """One line per evaluation that met the fault: the job's name and the process id."""
    return Path(root).with_name(Path(root).name + ".faults")


def _with_fault(fault, root, job, inputs, cpus):
    """Run the job; the sweep's first evaluation calls `fault` instead, in the middle of its job (its folder made)."""
    real = jobs.evaluate

    def evaluate(*a, **k):
        if marker(root).exists():
            return real(*a, **k)
        marker(root).write_text(f"{job.name} {os.getpid()}\n")
        fault()

    jobs.evaluate = evaluate
    try:
        return jobs.run_job(root, job, inputs, cpus)
    finally:
        jobs.evaluate = real


def _die():
    os._exit(1)   # the worker process is gone: no exception, no clean-up


def _raise():
    raise MixqError("injected error in an evaluation")


def run_job_dying_once(root, job, inputs, cpus, *finished_inputs):
    """The first evaluation kills its own worker process."""
    return _with_fault(_die, root, job, inputs, cpus)


def run_job_raising_once(root, job, inputs, cpus, *finished_inputs):
    """The first evaluation raises a MixqError (an error in mixq, not a lost worker)."""
    return _with_fault(_raise, root, job, inputs, cpus)

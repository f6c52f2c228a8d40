"""The local executors: `serial` (one job after another in this process) and `local` (independent jobs in
worker processes, as many at once as the cores and the memory estimates allow)."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import psutil

from mixq.errors import MixqError
from mixq.sweep.graph import Graph, Job, memory_estimate
from mixq.sweep.jobs import run_job
from mixq.sweep.progress import Progress, SweepResult, job_cpus
from mixq.threads import available_cores


def _inputs(graph: Graph, job: Job) -> dict[str, Job]:
    return {role: graph.jobs[i] for role, i in job.inputs.items()}


def run_serial(graph: Graph, progress: Progress) -> SweepResult:
    result = SweepResult()
    for job in graph.pending():
        progress.start(job)
        result.add(job, run_job(graph.root, job, _inputs(graph, job), job_cpus(graph, job, slots=1)))
        progress.finish(job)
    return result


class _Slots:
    """Cores and memory in use by running jobs; a job starts when it fits (or when nothing else runs)."""

    def __init__(self, cores: int, memory: int):
        self.cores, self.memory = cores, memory
        self.used_cores = self.used_memory = 0

    def fits(self, cpus: int, mem: int, running: int) -> bool:
        return running == 0 or (self.used_cores + cpus <= self.cores and self.used_memory + mem <= self.memory)

    def take(self, cpus: int, mem: int, sign: int = 1) -> None:
        self.used_cores += sign * cpus
        self.used_memory += sign * mem


def _lost(jobs: list[Job]) -> MixqError:
    names = ", ".join(f"{j.name} ({j.label})" for j in jobs) or "a job"
    return MixqError(f"sweep: a worker process died (killed, out of memory, or a script calling run_sweep without an "
                     f"`if __name__ == '__main__':` guard) while running {names}; finished jobs are kept: re-run to "
                     f"resume")


def run_local(graph: Graph, progress: Progress, workers: int | None = None) -> SweepResult:
    """Jobs in dependency order; ready jobs in parallel worker processes (spawned: no forked torch state).

    The first failure stops new jobs; running ones end first. A worker process that dies breaks the pool: every
    job running then is lost (their folders stay unfinished) and one MixqError names them."""
    cores = available_cores()
    slots = _Slots(cores, int(psutil.virtual_memory().available * 0.9))
    workers = workers or cores
    result, pending, running = SweepResult(), graph.pending(), {}
    finished = {j.id for j in graph.jobs.values()} - {j.id for j in pending}
    error, lost, broken = None, [], False
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        while (pending and error is None and not broken) or running:
            for job in [j for j in pending if all(d.id in finished for d in graph.deps(j))]:
                cpus, mem = job_cpus(graph, job, cores, workers), memory_estimate(graph, job)
                if error or broken or len(running) >= workers or not slots.fits(cpus, mem, len(running)):
                    continue
                try:
                    fut = pool.submit(run_job, graph.root, job, _inputs(graph, job), cpus)
                except BrokenProcessPool:   # a worker died since the last wait: its job is reported below
                    broken = True
                    continue
                slots.take(cpus, mem)
                running[fut] = (job, cpus, mem)
                pending.remove(job)
                progress.start(job)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                job, cpus, mem = running.pop(fut)
                slots.take(cpus, mem, -1)
                try:
                    result.add(job, fut.result())
                except BrokenProcessPool:
                    broken = True
                    lost.append(job)
                except Exception as e:  # noqa: BLE001 - the first failure is raised once running jobs end
                    error = error or e
                else:
                    finished.add(job.id)
                progress.finish(job)
    if broken:
        raise _lost(lost)
    if error is not None:
        raise error
    return result

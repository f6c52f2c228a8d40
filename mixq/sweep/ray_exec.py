"""The Ray executor (`mixq sweep --ray [ADDRESS]`, the optional `ray` extra): the same graph as Ray tasks.

Each job is one remote task requesting its cores, its estimated memory and (for a CUDA evaluation) a GPU; a
task's input jobs are passed as object refs, so Ray starts it once they are finished. Outputs go to the
sweep's output folder, which every node must see at the same path (a shared filesystem).

Failures: a task whose worker process (or node) dies is a system failure, which Ray re-runs up to `max_retries`
times; the retry finds the job's folder unfinished and starts it again (an eval resumes its run folder). An
exception raised by a job is an application error, which Ray does not retry (`retry_exceptions` stays off: a
mixq error would only recur); it is raised here as one line, and a re-run resumes. tests/test_sweep.py checks both.
"""

from __future__ import annotations

import os

from mixq.errors import MixqError
from mixq.sweep.graph import Graph, Job, memory_estimate
from mixq.sweep.jobs import run_job
from mixq.sweep.progress import Progress, SweepResult, job_cpus

MAX_RETRIES = 3
ENV_PASSED = ("MIXQ_CACHE", "PYTHONPATH", "HF_HOME", "HF_HUB_OFFLINE")


def _ray():
    try:
        import ray
    except ImportError:
        raise MixqError("--ray needs Ray: pip install 'mixq[ray]'") from None
    return ray


def _run_remote(root: str, job: Job, inputs: dict[str, Job], cpus: int, *finished_inputs) -> dict:
    """The task body: the input refs only order the task after its inputs."""
    return run_job(root, job, inputs, cpus)


def connect(address: str | None):
    """Join the cluster at `address` (or `auto`), or start a local instance; reuse a session already open."""
    ray = _ray()
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
        ray.init(address=address or None, runtime_env={"env_vars": env}, log_to_driver=False,
                 include_dashboard=False, configure_logging=False)
    return ray


def _largest_node(ray, resource: str) -> float:
    return max([n.get("Resources", {}).get(resource, 0) for n in ray.nodes() if n.get("Alive")] or [0])


def _submit(task, graph: Graph, job: Job, refs: dict, node: dict):
    mem = memory_estimate(graph, job)
    if node["memory"]:
        mem = min(mem, int(node["memory"] * 0.9))  # an estimate above every node would never be scheduled
    gpus = 1 if job.kind == "eval" and job.settings.get("device") == "cuda" else 0
    cpus = job_cpus(graph, job, int(node["CPU"]) or None)
    inputs = {role: graph.jobs[i] for role, i in job.inputs.items()}
    deps = [refs[i] for i in dict.fromkeys(job.inputs.values()) if i in refs]
    return task.options(num_cpus=cpus, num_gpus=gpus, memory=mem, max_retries=MAX_RETRIES, name=job.name).remote(
        str(graph.root), job, inputs, cpus, *deps)


CANCEL_WAIT_S = 60   # how long a failed sweep waits for its cancelled Ray tasks to end


def run_ray(graph: Graph, progress: Progress, address: str | None = None) -> SweepResult:
    ray = connect(address)
    node = {r: _largest_node(ray, r) for r in ("memory", "CPU")}
    task = ray.remote(_run_remote)
    refs: dict[str, object] = {}
    for job in graph.pending():       # dependency order: every input's ref exists before its users'
        refs[job.id] = _submit(task, graph, job, refs, node)
    by_ref = {ref: graph.jobs[i] for i, ref in refs.items()}
    result, left = SweepResult(), list(refs.values())
    while left:
        ready, left = ray.wait(left, num_returns=1)
        job = by_ref[ready[0]]
        try:
            result.add(job, ray.get(ready[0]))
        except ray.exceptions.RayError as e:   # an error in the job, or its worker lost more than MAX_RETRIES times
            for ref in left:   # the sweep stops: no job may still run (and finish) after this returns
                ray.cancel(ref, force=True)
            if left:
                ray.wait(left, num_returns=len(left), timeout=CANCEL_WAIT_S)
            cause = getattr(e, "cause", None)
            if isinstance(cause, MixqError):
                raise cause from None
            raise MixqError(f"sweep job {job.name} ({job.label}) failed on Ray: {cause or e!r}; "
                            f"re-run to resume (finished jobs are kept)") from None
        finally:
            progress.finish(job)
    return result

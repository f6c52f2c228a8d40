"""What executors share: the progress view (jobs done / running / left, ETA) and the record of what ran."""

from __future__ import annotations

from dataclasses import dataclass, field

from tqdm import tqdm

from mixq.sweep.graph import HEAVY, Graph, Job
from mixq.threads import available_cores


@dataclass
class SweepResult:
    ran: list[str] = field(default_factory=list)            # ids of the jobs executed in this call
    seconds: dict[str, float] = field(default_factory=dict)  # id -> seconds inside the job
    pids: dict[str, int] = field(default_factory=dict)       # id -> process that ran it
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)   # id -> (start, end), time.time()

    def add(self, job: Job, record: dict) -> None:
        if record["ran"]:
            self.ran.append(job.id)
            self.seconds[job.id] = record["seconds"]
            self.pids[job.id] = record["pid"]
            self.spans[job.id] = (record["start"], record["end"])


class Progress:
    """A tqdm bar over the jobs left to run (its ETA from the jobs finished so far), with the running ones."""

    def __init__(self, total: int, enabled: bool = True):
        self.bar = tqdm(total=total, unit="job", desc="sweep", disable=not enabled, dynamic_ncols=True)
        self.running: dict[str, str] = {}

    def _show(self) -> None:
        self.bar.set_postfix_str(f"running {len(self.running)}: {', '.join(self.running.values())}"[:80])

    def start(self, job: Job) -> None:
        self.running[job.id] = f"{job.kind} {job.label}"
        self._show()

    def finish(self, job: Job) -> None:
        self.running.pop(job.id, None)
        self.bar.update(1)
        self._show()

    def close(self) -> None:
        self.bar.close()


def job_cpus(graph: Graph, job: Job, cores: int | None = None, slots: int | None = None) -> int:
    """Cores for one job: a heavy job shares `cores` with the other jobs of its kind that may run beside it
    (at most `slots` at once; two evals on two cores: one each); light jobs take one."""
    if job.kind not in HEAVY:
        return 1
    if job.settings.get("threads"):   # an evaluation's fixed thread count
        return job.settings["threads"]
    cores = cores or available_cores()
    width = min(slots or cores, len(graph.by_kind(job.kind)))
    return max(1, cores // max(1, width))

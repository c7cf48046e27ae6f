"""Why a worker job is still pending, and whether waiting can ever help.

A job that asks for more than any node of its partition offers (8 cores on a 2-CPU node) is not
refused by `sbatch`: it sits in the queue as `PD (PartitionConfig)` for ever, and the flow waits
with it. `pending_jobs` reads what `squeue` says about the runner's jobs (state, reason, request);
`partition_nodes` what `sinfo` says about the partition's nodes; `diagnose` tells an ordinary wait
(Priority, Resources, a group limit that frees up when other jobs end) from one that cannot end by
waiting:

- the request exceeds every node of the partition (CPUs, memory, GPUs of the type), whatever the
  reason says;
- SLURM's reason says so: the partition's limits (`PartitionConfig`, `PartitionNodeLimit`,
  `PartitionTimeLimit`), a per-job QOS or association maximum (`QOSMaxCpuPerJobLimit`,
  `AssocMaxWallDurationPerJobLimit`, ...), an account or QOS the job may not use, or
  `ReqNodeNotAvail` while every node of the partition is down or drained.

`infra/slurm_runner.py` logs every pending job's reason once a minute and fails the flow, naming
the job, the reason and the request against what the partition offers, when no worker is
connected and every pending job is hopeless.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

# Reasons that never resolve by waiting (the job's own request breaks a fixed limit).
HOPELESS_REASONS = frozenset(
    {
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "BadConstraints",
        "InvalidAccount",
        "InvalidQOS",
    }
)
# Per-job maxima of a QOS or association (QOSMaxCpuPerJobLimit, AssocMaxWallDurationPerJobLimit, ...);
# group limits (QOSGrpCpuLimit, AssocGrpJobsLimit, ...) free up when other jobs end: a wait.
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob(Limit)?$")
_UNAVAILABLE_NODE_STATES = ("down", "drain", "drng", "fail", "maint", "inval", "unk", "no_respond", "powered_down")


@dataclass(frozen=True)
class PendingJob:
    """A job as `squeue` shows it: state, reason, and what it asks for."""

    job_id: str
    state: str
    reason: str
    partition: str
    cpus: int | None
    memory_mb: float | None  # per node
    gpus: int | None  # GPUs per node (of `gpu_type`, when named)
    gpu_type: str | None

    def request(self) -> str:
        parts = [f"{self.cpus} CPUs" if self.cpus is not None else None]
        parts.append(f"{_gb(self.memory_mb)} memory" if self.memory_mb is not None else None)
        if self.gpus:
            parts.append(f"{self.gpus} GPU(s)" + (f" of type {self.gpu_type}" if self.gpu_type else ""))
        return ", ".join(p for p in parts if p) + f" on partition {self.partition}"


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    memory_mb: float
    gpus: dict[str, int]  # type (or "" when untyped) -> count
    state: str

    @property
    def available(self) -> bool:
        return not any(s in self.state.lower() for s in _UNAVAILABLE_NODE_STATES)

    def fits(self, job: PendingJob) -> bool:
        if job.cpus is not None and job.cpus > self.cpus:
            return False
        if job.memory_mb is not None and job.memory_mb > self.memory_mb:
            return False
        if job.gpus:
            have = self.gpus.get(job.gpu_type, 0) if job.gpu_type else sum(self.gpus.values())
            if job.gpus > have:
                return False
        return True

    def offer(self) -> str:
        gpus = ", ".join(f"{n} GPU(s) of type {t}" if t else f"{n} GPU(s)" for t, n in self.gpus.items())
        return f"{self.name}: {self.cpus} CPUs, {_gb(self.memory_mb)} memory" + (f", {gpus}" if gpus else "")


def _gb(mb: float) -> str:
    return f"{mb / 1024:.3g} GB"


def parse_memory_mb(text: str) -> float | None:
    """squeue's `%m` / sinfo's memory: `64G`, `3000M`, `8192` (MB), `1T`; None when not a size."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", text or "", re.IGNORECASE)
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m.group(2).upper()]
    return float(m.group(1)) * scale


def parse_gres(text: str) -> dict[str, int]:
    """GPUs in a gres string: `gres:gpu:a100:1`, `gpu:a100:2(S:0)`, `gpu:4`, `gres/gpu=1` -> {type: n}."""
    out: dict[str, int] = {}
    for item in (text or "").split(","):
        item = re.sub(r"\(.*?\)", "", item.strip()).removeprefix("gres:").removeprefix("gres/")
        m = re.fullmatch(r"gpu(?::([\w.-]+))?[:=](\d+)", item)
        if m:
            out[m.group(1) or ""] = out.get(m.group(1) or "", 0) + int(m.group(2))
    return out


def parse_squeue(text: str) -> list[PendingJob]:
    """Lines of `squeue -h -o "%i|%T|%r|%P|%C|%m|%b"`."""
    jobs = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 7:
            continue
        job_id, state, reason, partition, cpus, memory, gres = fields
        gpus = parse_gres(gres)
        gpu_type, count = next(iter(gpus.items()), (None, None))
        jobs.append(
            PendingJob(
                job_id=job_id,
                state=state,
                reason=reason,
                partition=partition,
                cpus=int(cpus) if cpus.isdigit() else None,
                memory_mb=parse_memory_mb(memory),
                gpus=count,
                gpu_type=gpu_type or None,
            )
        )
    return jobs


def parse_sinfo(text: str) -> list[Node]:
    """Lines of `sinfo -h -N -o "%N|%c|%m|%G|%t"` (one per node and partition)."""
    nodes = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5 or not fields[1].isdigit():
            continue
        name, cpus, memory, gres, state = fields
        nodes.append(Node(name, int(cpus), parse_memory_mb(memory) or 0.0, parse_gres(gres), state))
    return nodes


def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def pending_jobs(job_ids: list[str]) -> list[PendingJob] | None:
    """The given jobs that are still pending; None when squeue cannot be asked."""
    if not job_ids:
        return []
    out = _run(["squeue", "-h", "-t", "PENDING", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%P|%C|%m|%b"])
    return None if out is None else parse_squeue(out)


def partition_nodes(partition: str) -> list[Node] | None:
    """The partition's nodes; None when sinfo cannot be asked or knows no such partition."""
    out = _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N|%c|%m|%G|%t"])
    nodes = None if out is None else parse_sinfo(out)
    return nodes or None


def diagnose(job: PendingJob, nodes: list[Node] | None) -> str | None:
    """Why waiting cannot help `job` (a sentence naming the request and what the partition
    offers), or None for an ordinary wait."""
    offer = "; ".join(n.offer() for n in nodes) if nodes else "unknown (sinfo gave nothing)"
    if nodes and not any(n.fits(job) for n in nodes):
        return f"it requests {job.request()}, more than any node there offers ({offer})"
    reason = job.reason.split(",")[0].strip()
    if reason in HOPELESS_REASONS or _PER_JOB_LIMIT.match(reason):
        return f"SLURM says {reason}: it requests {job.request()}; the partition offers {offer}"
    if reason == "ReqNodeNotAvail" and nodes and not any(n.available for n in nodes):
        states = ", ".join(f"{n.name} {n.state}" for n in nodes)
        return f"every node of partition {job.partition} is unavailable ({states}); it requests {job.request()}"
    return None

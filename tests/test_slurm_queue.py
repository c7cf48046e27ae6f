"""Telling an ordinary queue wait from one that waiting cannot end (infra/slurm_queue.py), on the
output squeue and sinfo gave on the local SLURM of infra/slurm/local-slurm.sh (slurm 22.05)."""

from __future__ import annotations

from infra.slurm_queue import diagnose, parse_gres, parse_memory_mb, parse_sinfo, parse_squeue

SQUEUE = """1|PENDING|PartitionConfig|gpu|8|64G|gres:gpu:a100:1
3|PENDING|Resources|gpu|2|1G|N/A
4|PENDING|Priority|gpu|1|1G|gres:gpu:a100:1
5|PENDING|QOSMaxCpuPerJobLimit|gpu|1|1G|gres:gpu:a100:1
6|PENDING|QOSGrpCpuLimit|gpu|1|1G|gres:gpu:a100:1
7|PENDING|ReqNodeNotAvail, UnavailableNodes:monolm-node|gpu|1|3000M|gres:gpu:a100:1
8|PENDING|Resources|gpu|1|3G|gres:gpu:a100:4
"""
SINFO = "monolm-node|2|8192|gpu:a100:2|mix\n"


def test_parsers():
    assert [parse_memory_mb(t) for t in ("64G", "3000M", "8192", "1T", "N/A")] == [65536, 3000, 8192, 1024**2, None]
    assert parse_gres("gres:gpu:a100:1") == {"a100": 1}
    assert parse_gres("gpu:a100:2(S:0-1),gpu:v100:1") == {"a100": 2, "v100": 1}
    assert parse_gres("gpu:4") == {"": 4} and parse_gres("N/A") == {} and parse_gres("(null)") == {}
    (node,) = parse_sinfo(SINFO + "junk line\n")
    assert (node.cpus, node.memory_mb, node.gpus, node.available) == (2, 8192, {"a100": 2}, True)
    jobs = {j.job_id: j for j in parse_squeue(SQUEUE)}
    assert (jobs["1"].cpus, jobs["1"].memory_mb, jobs["1"].gpus, jobs["1"].gpu_type) == (8, 65536, 1, "a100")
    assert (
        jobs["3"].gpus is None and jobs["1"].request() == "8 CPUs, 64 GB memory, 1 GPU(s) of type a100 on partition gpu"
    )


def test_hopeless_and_ordinary_waits():
    nodes = parse_sinfo(SINFO)
    jobs = {j.job_id: j for j in parse_squeue(SQUEUE)}
    why = {job_id: diagnose(job, nodes) for job_id, job in jobs.items()}
    # More than the node has, whatever the reason: named against what the partition offers.
    assert why["1"] == (
        "it requests 8 CPUs, 64 GB memory, 1 GPU(s) of type a100 on partition gpu, more than any node there "
        "offers (monolm-node: 2 CPUs, 8 GB memory, 2 GPU(s) of type a100)"
    )
    assert "more than any node" in why["8"]  # 4 GPUs on a 2-GPU node
    assert why["5"].startswith("SLURM says QOSMaxCpuPerJobLimit")  # a per-job maximum
    # Ordinary waits: the queue, the node busy, a group limit that frees up, a node that is up.
    assert why["3"] is None and why["4"] is None and why["6"] is None and why["7"] is None
    drained = parse_sinfo("monolm-node|2|8192|gpu:a100:2|drain\n")
    assert "every node of partition gpu is unavailable (monolm-node drain)" in diagnose(jobs["7"], drained)

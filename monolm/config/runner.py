"""Where stages run: the task-runner profile, retries and timeouts, and the SLURM site settings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from monolm.config.base import NonNegInt, PositiveFloat, PositiveInt, Strict
from monolm.study.registry import stage_names

# Upper bounds: a typo (or a stranger's parameter) must not queue thousands of GPU jobs or fork
# hundreds of local workers on a shared node.
MaxJobs = Annotated[int, Field(ge=1, le=256)]
MaxLocalWorkers = Annotated[int, Field(ge=1, le=64)]


class SlurmConfig(Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cores: PositiveInt = 8
    memory: str = "64GB"
    walltime: str = "24:00:00"
    gpu_type: str = "a100"
    gpus_per_job: Annotated[int, Field(ge=1, le=16)] = 1
    min_workers: Annotated[int, Field(ge=0, le=256)] = 0
    max_workers: MaxJobs = 4
    lifetime_margin_minutes: PositiveInt = 10  # workers drain this long before walltime
    job_directives_skip: list[str] = []
    job_extra_directives: list[str] = []
    prologue: list[str] = []  # shell lines run before the worker (module load, venv activate)
    python: str | None = None  # worker interpreter; None -> this interpreter
    local_directory: str | None = None
    log_directory: str | None = None
    # Network interface (ib0, eth0; `lo` for a one-node cluster) the dask scheduler and workers
    # listen on; None: dask's default (every interface of the host; TLS keeps strangers out).
    interface: str | None = None
    # Private (0700) folder on the shared filesystem for the dask cluster's TLS key, which worker
    # jobs read; None: <paths.runs_root>/.state/dask-tls.
    tls_directory: str | None = None
    # A SQLite results store on this profile: only for a one-node SLURM whose jobs share this
    # machine's disk (infra/slurm/local-slurm.sh); a real cluster needs PostgreSQL.
    allow_sqlite: bool = False


class RunnerConfig(Strict):
    profile: Literal["local", "dask-local", "slurm"] = "local"
    dask_workers: MaxLocalWorkers = 2
    retries: NonNegInt = 2
    retry_delay_seconds: NonNegInt = 10
    stage_timeout_minutes: dict[str, PositiveFloat] = {}
    slurm: SlurmConfig = SlurmConfig()

    @model_validator(mode="after")
    def _known_stages(self) -> RunnerConfig:
        for stage in self.stage_timeout_minutes:
            if stage not in stage_names():
                raise ValueError(
                    f"runner.stage_timeout_minutes.{stage}: unknown stage; allowed: {', '.join(stage_names())}"
                )
        return self

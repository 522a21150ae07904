"""The Slurm job: one ``srun`` task per node running ``launch/run_node.sh`` (torchrun
for that node's ranks plus the stop / requeue logic, see that script).

Long horizons: the job asks for ``--signal=USR1@<grace>`` (to the tasks) and
``--requeue``. On the signal the trainer checkpoints and stops after its current
step; an unfinished run requeues itself and the new job resumes from the newest
complete checkpoint, as does a resubmitted or ``--dependency=afterany`` chained job.
Failures: torchrun restarts a failed or hung trainer in place, on every node, at
most ``max_restarts`` times (``MAX_RESTARTS``), each start resuming from the newest
verified checkpoint; then the job fails with one line (``docs/launch.md``).
:func:`render_sbatch` writes the plain sbatch script; the nemo-run path
(:mod:`launch.nemo`) submits the same task with the same settings.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from launch.recipes import Recipe

NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # NCCL's flight recorder: a hung rank's report (trainer/watchdog.py) lists its last collectives
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
}


@dataclass
class JobSpec:
    name: str
    config: str
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    time: str
    out_dir: str
    repo: str
    python: str = "python"
    partition: str | None = None
    account: str | None = None
    container_image: str | None = None
    container_mounts: str | None = None
    signal_grace_s: int = 180
    max_restarts: int = 3          # torchrun restarts of a failed or hung trainer per allocation
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_recipe(cls, name: str, recipe: Recipe, **kw) -> JobSpec:
        nodes = kw.pop("nodes", None) or recipe.nodes
        time = kw.pop("time", None) or recipe.time
        procs = kw.pop("procs_per_node", None) or recipe.procs_per_node
        gpus = procs if recipe.gpus_per_node else 0  # a GPU job runs one rank per GPU
        return cls(name=name, config=recipe.config, nodes=nodes, gpus_per_node=gpus,
                   procs_per_node=procs, time=time, **kw)

    @property
    def job_name(self) -> str:
        return f"lpreg-{self.name}"

    @property
    def logs(self) -> str:
        return self.log_dir or f"{self.out_dir}/slurm"

    def environment(self) -> dict[str, str]:
        env = dict(NCCL_ENV) if self.gpus_per_node else {"OMP_NUM_THREADS": "1"}
        env.update(OUT_DIR=self.out_dir, NPROC_PER_NODE=str(self.procs_per_node), PYTHON=self.python,
                   REPO=self.repo, MAX_RESTARTS=str(self.max_restarts))
        env.update(self.env)
        return env

    def node_command(self) -> list[str]:
        # absolute: nemo-run's srun changes into its own job directory
        return ["bash", f"{self.repo}/launch/run_node.sh", self.config, *self.overrides]


# computed inside the job: the first node hosts the torchrun rendezvous
RENDEZVOUS_LINES = [
    'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
]


def render_sbatch(job: JobSpec) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job.job_name}", f"#SBATCH --nodes={job.nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={job.time}"]
    if job.gpus_per_node:
        lines += [f"#SBATCH --gpus-per-node={job.gpus_per_node}", "#SBATCH --exclusive"]
    else:
        lines.append(f"#SBATCH --cpus-per-task={job.procs_per_node}")
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        lines.append(f"#SBATCH --account={job.account}")
    lines += ["#SBATCH --requeue", f"#SBATCH --signal=USR1@{job.signal_grace_s}", "#SBATCH --open-mode=append",
              f"#SBATCH --output={job.logs}/slurm-%j.out", "", "set -uo pipefail", f"cd {shlex.quote(job.repo)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(job.environment().items())]
    lines += RENDEZVOUS_LINES
    srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
    if job.container_image:
        srun.append(f"--container-image={job.container_image}")
        if job.container_mounts:
            srun.append(f"--container-mounts={job.container_mounts}")
    lines.append(" ".join(srun + [shlex.quote(a) for a in job.node_command()]))
    return "\n".join(lines) + "\n"

"""The nemo-run path: the same job as :func:`launch.script.render_sbatch`, submitted by
nemo-run's ``SlurmExecutor`` (or run by its ``LocalExecutor``).

nemo-run is an optional extra (``pip install -e .[launch]``, in its own
environment if its pins clash with vLLM's); the trainer itself never imports it.
"""

from __future__ import annotations

import importlib.util
import shlex

from launch.script import RENDEZVOUS_LINES, JobSpec


def available() -> bool:
    return importlib.util.find_spec("nemo_run") is not None




def slurm_executor(job: JobSpec):
    import nemo_run as run

    kw = dict(
        account=job.account or "",
        partition=job.partition,
        time=job.time,
        nodes=job.nodes,
        ntasks_per_node=1,
        signal=f"USR1@{job.signal_grace_s}",
        open_mode="append",
        env_vars=job.environment(),
        additional_parameters={"requeue": True},
        setup_lines="\n".join([f"cd {shlex.quote(job.repo)}", *RENDEZVOUS_LINES]),
        # job files and logs under NEMORUN_HOME/experiments (~/.nemo_run by default); a custom
        # LocalTunnel job_dir makes nemo-run 0.11 write mangled --output paths
        tunnel=run.LocalTunnel(job_dir=""),
        job_name_prefix="nemo.",
    )
    if job.gpus_per_node:
        kw.update(gpus_per_node=job.gpus_per_node, exclusive=True)
    else:
        kw.update(cpus_per_task=job.procs_per_node)
    if job.container_image:
        kw["container_image"] = job.container_image
        if job.container_mounts:
            kw["container_mounts"] = job.container_mounts.split(",")
    return run.SlurmExecutor(**kw)


def task(job: JobSpec):
    import nemo_run as run

    return run.Script(inline=" ".join(shlex.quote(a) for a in job.node_command()))


def submit(job: JobSpec, *, dryrun: bool) -> None:
    import nemo_run as run

    run.run(task(job), executor=slurm_executor(job), name=job.job_name, dryrun=dryrun, detach=True)

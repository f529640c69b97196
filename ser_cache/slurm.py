"""SLURM job arrays for both stages: which part a job does, and the scripts that submit them.

    ser-cache slurm --tasks N extract ARGS  -->  one array job of N tasks, each
                                                 `ser-cache extract ARGS` on its part
    ser-cache slurm --tasks N sweep ARGS    -->  the same for `sweep`, then one job that runs
                                                 `ser-cache report` once every task ended well

A job's part. Inside an array task, `extract` and `sweep` read SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT (`array_part`) when no --shard / --part is given, so the script runs
the same command in every task. IDs need not start at 0 (`--array 1-8`: SLURM_ARRAY_TASK_MIN)
or step by 1 (`--array 0-14:2`: SLURM_ARRAY_TASK_STEP); an array with gaps (`--array 1,3,7`)
cannot be mapped onto parts and is refused with the fix. The parts only spread the work: any
number of processes on one folder are kept apart by claims (locks.Claims), so a task re-run by
`scontrol requeue`, or a second submission, does no work twice.

Why sbatch scripts written by the tool, rather than submitit or a scheduler of our own: no
extra dependency, and nothing of ours runs between the jobs: SLURM alone schedules, retries
and orders them (`--dependency=afterok`). The scripts are plain files that users can read,
edit (modules to load, accounts, QOS, GPUs) and submit by hand, and that their cluster's
support staff recognise; `--dry-run` prints them without submitting. submitit pickles a
Python callable per task and needs its own package on every node; its strength, running
arbitrary functions, is not needed for two command lines.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionError, UserError

ENV_ID, ENV_COUNT, ENV_MIN, ENV_STEP = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                        "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
COMMANDS = ("extract", "sweep")
PART_OPTION = {"extract": "--shard", "sweep": "--part"}


class SlurmError(UserError):
    """sbatch missing or refusing a job; the message names the fix."""


def parse_part(spec: str, option: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; `option` names the option in the error."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise OptionError(f"{option} {spec!r}: write I/N, for example 0/4 for the first of 4 jobs") from None
    if not 0 <= i < n:
        raise OptionError(f"{option} {spec!r}: need 0 <= I < N (I counts from 0)")
    return i, n


def array_part(env=os.environ) -> tuple[int, int] | None:
    """(I, N) of this SLURM array task, counted from 0, or None outside an array job."""
    if ENV_ID not in env:
        return None
    try:
        task, count = int(env[ENV_ID]), int(env[ENV_COUNT])
        first, step = int(env.get(ENV_MIN, 0)), int(env.get(ENV_STEP, 1) or 1)
    except (KeyError, ValueError):
        raise OptionError(f"{ENV_ID} is set but {ENV_COUNT} is missing or not a number (SLURM older than "
                          "17.11?): pass the part explicitly, e.g. --shard $SLURM_ARRAY_TASK_ID/N") from None
    i, off_step = divmod(task - first, step)
    if off_step or not 0 <= i < count:
        raise OptionError(f"array task {task} of an array with {count} tasks from {first} in steps of {step} "
                          "does not map onto parts 0..N-1 (an array with gaps?): submit --array 0-(N-1), or "
                          "pass the part explicitly, e.g. --shard I/N")
    return i, count


def resolve_part(spec: str | None, option: str, env=os.environ) -> tuple[int, int]:
    """The part this process does: `spec` when given (it wins), else the SLURM array task's,
    else (0, 1), the whole."""
    if spec is not None:
        return parse_part(spec, option)
    return array_part(env) or (0, 1)


# --- scripts ------------------------------------------------------------------------------------


@dataclass
class JobOptions:
    """What `ser-cache slurm` passes to sbatch. None: the cluster's default."""

    tasks: int
    job_name: str
    log_dir: Path
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    extra: tuple[str, ...] = ()  # further sbatch options, as typed (e.g. --gres=gpu:1)

    def directives(self) -> list[str]:
        """The #SBATCH lines every job of this submission shares."""
        lines = [f"--partition={self.partition}" if self.partition else None,
                 f"--time={self.time}" if self.time else None,
                 f"--cpus-per-task={self.cpus_per_task}" if self.cpus_per_task else None,
                 f"--mem={self.mem}" if self.mem else None, *self.extra]
        return [f"#SBATCH {line}" for line in lines if line]


def ser_cache_command() -> list[str]:
    """How a job runs this very installation: its `ser-cache` beside this Python, else the module."""
    script = Path(sys.executable).with_name("ser-cache")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ser_cache.cli"]


def array_script(command: str, args: list[str], opts: JobOptions, workdir: Path, after: str | None = None) -> str:
    """The array job: task I of N runs `ser-cache COMMAND ARGS` on part I/N (read from the
    SLURM environment by the command itself); with `after`, once that job has ended well."""
    return "\n".join([
        "#!/bin/bash",
        f"# ser-cache {command}, split over a SLURM array: task I of N does part I/N, which",
        "# `ser-cache` reads from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT. Tasks that",
        "# overlap (a requeue, a second submission) never do one piece of work twice.",
        f"#SBATCH --job-name={opts.job_name}",
        f"#SBATCH --array=0-{opts.tasks - 1}",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={opts.log_dir / '%x-%A_%a.out'}",
        *([f"#SBATCH --dependency=afterok:{after}", "#SBATCH --kill-on-invalid-dep=yes"] if after else []),
        *opts.directives(),
        "set -euo pipefail",
        shlex.join([*ser_cache_command(), command, *args]),
        ""])


def report_script(sweep_out: Path, opts: JobOptions, workdir: Path) -> str:
    """The job after a sweep's array: the report, once every array task ended well."""
    return "\n".join([
        "#!/bin/bash",
        "# After the sweep's array job (submitted with --dependency=afterok:ARRAY_ID): the table and plots.",
        f"#SBATCH --job-name={opts.job_name}-report",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --output={opts.log_dir / '%x-%j.out'}",
        "#SBATCH --kill-on-invalid-dep=yes",  # an array task failed: cancel, do not wait forever
        *[line for line in opts.directives() if "--cpus-per-task" not in line],
        "set -euo pipefail",
        shlex.join([*ser_cache_command(), "report", str(sweep_out)]),
        ""])


@dataclass
class Submission:
    """The scripts of one `ser-cache slurm` call and, once submitted, their job ids."""

    array: str
    report: str | None
    array_path: Path
    report_path: Path | None
    array_id: str | None = None
    report_id: str | None = None


def plan_submission(command: str, args: list[str], out: Path, opts: JobOptions, workdir: Path,
                    after: str | None = None) -> Submission:
    """The scripts for `ser-cache COMMAND ARGS` over opts.tasks array tasks, the array waiting
    for job `after` if given (nothing written)."""
    script_dir = opts.log_dir
    report = report_script(out, opts, workdir) if command == "sweep" else None
    if after is not None and not after.isdigit():
        raise OptionError(f"--after {after!r}: give the job id that sbatch (or `ser-cache slurm`) printed, e.g. 1234")
    return Submission(array_script(command, args, opts, workdir, after), report,
                      script_dir / f"{opts.job_name}.sbatch",
                      script_dir / f"{opts.job_name}-report.sbatch" if report else None)


def submit(sub: Submission) -> Submission:
    """Write the scripts and submit them: the array, then the report job depending on it."""
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch not found: run this on a SLURM login node, or use --dry-run to see the "
                         "scripts and submit them elsewhere")
    sub.array_path.parent.mkdir(parents=True, exist_ok=True)
    sub.array_path.write_text(sub.array, encoding="utf-8")
    sub.array_id = sbatch([str(sub.array_path)])
    if sub.report is not None:
        sub.report_path.write_text(sub.report, encoding="utf-8")
        sub.report_id = sbatch([f"--dependency=afterok:{sub.array_id}", str(sub.report_path)])
    return sub


def sbatch(args: list[str]) -> str:
    """Run `sbatch --parsable ARGS`; the job id it printed ("ID" or "ID;CLUSTER")."""
    done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise SlurmError(f"sbatch {' '.join(args)} failed: {why[-1] if why else f'exit status {done.returncode}'}")
    job_id = done.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {done.stdout.strip()!r}, not a job id: check `sbatch --version`")
    return job_id

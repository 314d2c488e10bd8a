"""``python -m dptrain.worker JOB.yaml``: one rank of a data-parallel training job (run it under
``mpiexec -n N``; see ``--help``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import TYPE_CHECKING

from dptrain.worker.checkpoint import CheckpointDiskFull
from dptrain.worker.exit_codes import (
    EXIT_DISK_FULL,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_PREEMPTED,
)
from dptrain.worker.train import JobFailed, agree, install_preemption_handler

if TYPE_CHECKING:
    from dptrain.worker.comm import Communicator

_FORWARD_S = 0.5  # how long a failing rank waits for its message to be relayed before aborting

EPILOG = f"""\
Run every rank of the job with the same arguments, e.g.
  mpiexec -n 2 .venv/bin/python -m mpi4py -m dptrain.worker examples/digits_mlp.yaml \
      --checkpoint-dir ckpt
(-m mpi4py: an uncaught exception on any rank ends every rank through MPI_Abort)

A job with an entrypoint runs its own training script on every rank instead (see
dptrain.worker.init); the script's modules, like a job's own model, loss and data set, are
imported from the job file's directory (or its code: directory), put first on sys.path.

Rank 0 shows a progress bar and messages on stderr and prints the final metrics as one JSON
line on stdout. Checkpoints go to CHECKPOINT_DIR/step-NNNNNNNN/ (model.safetensors,
optimizer.safetensors, manifest.json). SIGTERM finishes the current step, writes a
checkpoint and exits with {EXIT_PREEMPTED}; run again with --resume to continue exactly.

Set DPTRAIN_COORDINATOR to the coordinator's address to also report progress to it.

exit codes:
  {EXIT_OK}    the run completed
  {EXIT_FAILED}    a rank failed; its error is printed and the whole job is aborted
  {EXIT_INVALID}    invalid job: spec, data, batch size for this number of ranks, a model
       module that cannot be imported, or checkpoint
  {EXIT_DIVERGED}    the loss became non-finite (the message names the step)
  {EXIT_DISK_FULL}    no space left to write a checkpoint (the message says where); the
       checkpoints written before are intact
  {EXIT_PREEMPTED}  preempted by SIGTERM after writing a checkpoint
"""


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        prog="python -m dptrain.worker", epilog=EPILOG,
        formatter_class=argparse.RawTextHelpFormatter,
        description="Train a job spec data-parallel: one process per rank, under mpiexec.")
    parser.add_argument("job", metavar="JOB", help="the job file (.yaml, .yml or .json)")
    parser.add_argument("--checkpoint-dir", metavar="D", default=None,
                        help="write checkpoints here (default: none are written)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest intact checkpoint in\n"
                             "--checkpoint-dir (from step 0 when there is none)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (messages and the JSON line still\nappear)")
    return parser


def _fetch_resume_checkpoint(rank: int, checkpoint_dir: str) -> None:
    """On rank 0, put the coordinator's latest intact checkpoint of the job into checkpoint_dir."""
    if rank == 0:
        from dptrain.worker.events import fetch_resume_checkpoint

        try:
            fetch_resume_checkpoint(checkpoint_dir, os.environ)
        except Exception as e:
            raise RuntimeError(f"cannot fetch the checkpoint to resume from: {e}") from None


def _end_every_rank(comm: Communicator, message: str, code: int) -> int:
    """Say why this rank fails, alone, and end every rank of the job with `code`."""
    # One write, then a moment for mpiexec to forward it: MPI_Abort tears down the processes
    # that relay our stderr, and what they have not read yet is lost.
    sys.stderr.write(message)
    sys.stderr.flush()
    if comm.size > 1:
        time.sleep(_FORWARD_S)
        comm.abort(code)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one rank of a job.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code (see ``--help``).
    """
    args = build_parser().parse_args(argv)
    install_preemption_handler()  # before anything slow, so SIGTERM never kills a rank mid-step
    from dptrain.worker.comm import Communicator

    comm = Communicator()
    code = _run(args, comm)
    # Every rank agreed on `code` (a rank failing alone aborts the job instead): end MPI
    # together, so that the exit code reaches mpiexec without MPI_Abort cutting off the others.
    comm.finalize()
    return code


def _run(args: argparse.Namespace, comm: Communicator) -> int:
    """The job on this rank; returns the exit code every rank agreed on."""
    from dptrain.worker.context import Launch, entrypoint_script, run_entrypoint
    from dptrain.worker.environment import COORDINATOR, world_size_error
    from dptrain.worker.events import build_reporters
    from dptrain.worker.job_code import code_directory, put_first_on_path
    from dptrain.worker.module_policy import check_job_code
    from dptrain.worker.spec import JobSpecError, load_spec
    from dptrain.worker.train import run_job

    if (mismatch := world_size_error(comm.size)) is not None:
        print(f"dptrain worker: error: {mismatch}", file=sys.stderr, flush=True)
        return EXIT_INVALID  # every task is alone in its world: each exits by itself
    reporters = []
    try:
        spec = agree(comm, lambda: load_spec(args.job), (JobSpecError,))
        # The job's own modules come first, on every rank, whoever started it.
        code_dir = agree(comm, lambda: code_directory(args.job, spec.code), (JobSpecError,))
        put_first_on_path(code_dir)
        # Under a coordinator, the code the job may run: checked again before any import.
        agree(comm, lambda: check_job_code(spec, code_dir), (JobSpecError,))
        if args.resume and args.checkpoint_dir and os.environ.get(COORDINATOR):
            # Rank 0 fetches the job's latest checkpoint; agree() is the barrier the others wait at.
            agree(comm, lambda: _fetch_resume_checkpoint(comm.rank, args.checkpoint_dir),
                  (Exception,), exit_code=EXIT_FAILED)
        reporters = agree(comm, lambda: build_reporters(comm.rank, os.environ,
                                                        progress=not args.no_progress),
                          (ImportError, AttributeError), exit_code=EXIT_INVALID)
        if spec.entrypoint is not None:  # the job's own loop: its script on every rank
            launch = Launch(comm, reporters, args.checkpoint_dir, args.resume,
                            spec.to_dict(), spec.checkpoint.keep)
            agree(comm, lambda: entrypoint_script(spec.entrypoint, code_dir), (JobSpecError,))
            run_entrypoint(spec.entrypoint, code_dir, launch)
            return EXIT_OK
        result = run_job(spec, comm, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                         reporters=reporters)
        return result.exit_code
    except JobFailed as e:  # raised alike on every rank: rank 0 says it, all exit cleanly
        if comm.rank == 0:
            print(f"dptrain worker: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except CheckpointDiskFull as e:  # rank 0 alone: a reason, not a traceback
        return _end_every_rank(comm, f"dptrain worker: error: {e}\n", EXIT_DISK_FULL)
    except BaseException as e:  # this rank alone: say it, then end every rank of the job
        return _end_every_rank(comm, traceback.format_exc() + f"dptrain worker: rank "
                               f"{comm.rank} of {comm.size} failed: {type(e).__name__}: {e}\n",
                               EXIT_FAILED)
    finally:
        for reporter in reporters:
            reporter.close()


if __name__ == "__main__":
    sys.exit(main())

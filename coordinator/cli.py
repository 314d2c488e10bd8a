"""The ``dptrain`` command: ``dptrain run JOB.yaml -n N`` trains a job on this machine (or a
hostfile's hosts); ``dptrain tls init`` writes a coordinator's TLS files;
``dptrain serve`` runs the coordinator and ``submit``, ``jobs``, ``status``, ``watch``, ``logs``,
``cancel``, ``checkpoints``, ``download``, ``plot``, ``user`` and ``demo`` use it
(`coordinator.commands`); ``dptrain render-job`` prints the manifest a launcher would give a
job.

Subcommands are argparse subparsers, each with its own ``handler(args) -> exit code``. Errors
are one readable line on stderr, never a traceback (``DPTRAIN_DEBUG=1`` shows the traceback of
an unexpected one).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dptrain.worker.mpiexec_command import LaunchSettings

__all__ = ["main", "build_parser", "CommandError"]

EXIT_CODES = """\
exit codes of `dptrain run` (the coordinator's commands list theirs in their --help):
  0    the run completed
  1    a rank failed; its error is printed and the whole job is aborted
  2    bad command line or invalid job (spec, data, ranks, model module, checkpoint)
  3    the loss became non-finite (the message names the step)
  143  preempted by SIGTERM after writing a checkpoint (continue with --resume)
"""


class CommandError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _cmd_run(args: argparse.Namespace) -> int:
    from dptrain.worker.hostfile import is_local, read_hostfile
    from dptrain.worker.mpiexec_command import LaunchSettings, mpiexec_command
    from dptrain.worker.spec import JobSpecError, check_shards, load_spec

    script = args.job.endswith(".py")  # your own training script, run as is on every rank
    if script:
        if not os.path.isfile(args.job):
            raise CommandError(f"{args.job}: no such script")
        workers = 1
    else:
        if args.args:
            raise CommandError(f"arguments after the job file ({' '.join(args.args)}) are "
                               "for a training script (dptrain run train.py -- ARGS)")
        try:
            spec = load_spec(args.job)
        except JobSpecError as e:
            raise CommandError(str(e)) from None
        workers = spec.workers
    n = workers if args.n is None else args.n
    if n < 1:
        raise CommandError(f"-n must be >= 1, got {n}")
    if not script and spec.batch_size is not None and (
            error := check_shards(spec.batch_size, n)) is not None:
        raise CommandError(str(error))
    if args.resume and args.checkpoint_dir is None:
        raise CommandError("--resume needs --checkpoint-dir")
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    settings = LaunchSettings(
        job=os.path.abspath(args.job), workers=n,
        checkpoint_dir=None if args.checkpoint_dir is None else os.path.abspath(
            args.checkpoint_dir),
        resume=args.resume, hosts=hosts, launcher_exec=args.launcher_exec,
        # One rank per core, pinned; with more ranks than local cores pinning would stack them.
        bind_to="core" if args.hostfile or n <= (os.cpu_count() or 1) else None,
        blas_threads=None if args.blas_threads == 0 else args.blas_threads,
        progress=not args.no_progress, script_args=tuple(args.args))
    cmd = mpiexec_command(settings)
    if not (os.path.isfile(cmd[0]) or shutil.which(cmd[0])):
        raise CommandError(f"mpiexec not found at {cmd[0]} (install the mpich wheel into "
                           f"this environment: pip install mpich, or name your MPI's in "
                           f"DPTRAIN_MPIEXEC)")
    if hosts and not is_local(hosts):
        _preflight(hosts, settings)
    return _run_forwarding_signals(cmd)


def _preflight(hosts: tuple[tuple[str, int], ...], settings: LaunchSettings) -> None:
    """The coordinator's preflight, for ``dptrain run --hostfile``: every other host reached
    through the same remote shell, the interpreter, dptrain's version and the job file there."""
    from dptrain.coordinator.server.launchers.preflight import preflight_commands, run_preflight

    paths = [settings.job] + ([settings.checkpoint_dir] if settings.resume else [])
    try:
        run_preflight(preflight_commands(hosts, python=settings.python, paths=paths,
                                         launcher_exec=settings.launcher_exec))
    except OSError as e:
        raise CommandError(str(e)) from None


def _run_forwarding_signals(cmd: list[str]) -> int:
    """Run `cmd`; SIGTERM to us goes on to it (mpiexec passes it to every rank)."""
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reached mpiexec too; wait for it to wind down
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 - code if code < 0 else code


def build_parser() -> argparse.ArgumentParser:
    """The ``dptrain`` argument parser, one subparser per subcommand.

    Returns:
        The parser; each subcommand sets ``handler``.
    """
    parser = argparse.ArgumentParser(
        prog="dptrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distributed data-parallel training with dptrain.", epilog=EXIT_CODES)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a job here or on a hostfile's hosts: mpiexec -n N python -m mpi4py -m "
             "dptrain.worker JOB",
        description="Train a job with N ranks on this machine (or the hosts of --hostfile)\n"
                    "through this environment's mpiexec. Rank 0 shows a progress bar; the\n"
                    "run ends with one JSON line of final metrics on stdout. A job's own\n"
                    "modules are imported from the job file's directory (or its code:).\n"
                    "JOB may also be your own training script (train.py, using\n"
                    "dptrain.worker.init()): every rank runs python train.py ARGS.",
        epilog="examples:\n  dptrain run examples/digits_mlp.yaml -n 2 --checkpoint-dir ckpt\n"
               "  dptrain run train.py -n 2 --checkpoint-dir ckpt -- --lr 0.1\n\n"
               + EXIT_CODES)
    run.add_argument("job", metavar="JOB", help="the job file (.yaml, .yml or .json), or a "
                                                "training script (.py)")
    run.add_argument("args", nargs="*", metavar="ARG",
                     help="the training script's arguments (after --)")
    run.add_argument("-n", type=int, default=None, metavar="N",
                     help="number of ranks (default: the job's workers; 1 for a script)")
    run.add_argument("--checkpoint-dir", metavar="D", default=None,
                     help="write checkpoints to D/step-NNNNNNNN/ (default: none)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest intact checkpoint in D (from step 0 when "
                          "there is none)")
    run.add_argument("--hostfile", metavar="FILE", default=None,
                     help="run across machines: one 'host', 'host:N' or 'host slots=N' per "
                          "line (# comments); the same file as dptrain serve --hostfile")
    run.add_argument("--launcher-exec", metavar="CMD", default=None,
                     help="the remote shell that starts ranks on the other hosts (mpiexec's "
                          "-launcher-exec; called like ssh: CMD -x HOST 'command'; default ssh)")
    run.add_argument("--blas-threads", type=int, default=1, metavar="T",
                     help="BLAS threads per rank (default 1; 0 keeps the environment's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=_cmd_run)
    from dptrain.coordinator.client.commands import (
        add_commands,
        add_global_options,
        add_kubernetes_options,
    )

    add_global_options(parser)
    add_commands(commands, serve=_cmd_serve, demo=_cmd_demo)
    _add_tls_command(commands)
    _add_backup_command(commands)
    _add_proto_path_command(commands)
    render = commands.add_parser(
        "render-job", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print the manifest a job would get from a launcher (kubernetes: its MPIJob)",
        description="Print, as YAML, the MPIJob the coordinator's kubernetes launcher would\n"
                    "create for a job's first attempt. Nothing is contacted: the job file is\n"
                    "read, not validated (the coordinator validates it at submission).",
        epilog="example:\n  dptrain render-job examples/digits_mlp.yaml --launcher kubernetes "
               "\\\n      --image registry.example.org/dptrain:0.1.0 --namespace ml\n\n"
               "exit codes:\n  0  printed\n  2  bad command line or unreadable job file\n")
    render.add_argument("job", metavar="JOB.yaml", help="the job file (.yaml, .yml or .json)")
    render.add_argument("--launcher", choices=["kubernetes"], required=True,
                        help="the launcher whose manifest to print")
    render.add_argument("--job-id", default="j-000000000000", metavar="ID",
                        help="the job id to render with (default j-000000000000)")
    render.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                        help="the coordinator's address as the pods reach it (default: "
                             "dptrain-coordinator.NS.svc:50051, deploy/kubernetes' Service)")
    render.add_argument("--cluster-state-dir", metavar="DIR", default="/var/lib/dptrain",
                        help="the coordinator's state directory in the cluster (default "
                             "/var/lib/dptrain, deploy/kubernetes' Deployment)")
    add_kubernetes_options(render)
    render.set_defaults(handler=_cmd_render_job)
    return parser


def _add_tls_command(commands: argparse._SubParsersAction) -> None:
    tls = commands.add_parser(
        "tls", help="TLS files for a coordinator that other hosts reach",
        description="TLS files for a coordinator that other hosts reach.")
    actions = tls.add_subparsers(dest="tls_command", metavar="ACTION", required=True)
    init = actions.add_parser(
        "init", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write a CA and the coordinator's certificate and key",
        description="Write DIR/ca.pem (a new CA: what workers and users verify the coordinator\n"
                    "with), DIR/server.pem (the coordinator's certificate, signed by that CA,\n"
                    "for every --host) and DIR/server.key (mode 0600), then print the\n"
                    "dptrain serve and client flags that use them. The CA's key is not kept.",
        epilog="example:\n  dptrain tls init /etc/dptrain/tls --host coord.example.org "
               "--host 10.0.0.5\n")
    init.add_argument("directory", metavar="DIR", help="where to write the files")
    init.add_argument("--host", metavar="NAME", action="append", required=True,
                      help="a DNS name or IP address the coordinator is reached at "
                           "(repeatable; the first is the one printed)")
    init.add_argument("--port", type=int, default=50051,
                      help="the coordinator's port, for the printed flags (default 50051)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=_cmd_tls_init)


def _add_backup_command(commands: argparse._SubParsersAction) -> None:
    backup = commands.add_parser(
        "backup", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="copy the coordinator's state directory, consistently, while it runs",
        description="Copy the state directory's database (SQLite's online backup: one\n"
                    "snapshot), its checkpoint and code files and its token into DEST, a new\n"
                    "directory: start a coordinator with --state-dir DEST to restore. Run it on\n"
                    "the coordinator's machine; the coordinator may keep running. Worker logs\n"
                    "(jobs/) are not copied. See docs/operations.md.",
        epilog="example:\n  dptrain backup --state-dir /var/lib/dptrain "
               "/backup/dptrain-$(date +%F)\n\n"
               "exit codes:\n  0  copied\n  2  bad command line, no database, DEST not "
               "empty\n")
    backup.add_argument("destination", metavar="DEST", help="the new directory")
    backup.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="the coordinator's state directory (default: $DPTRAIN_STATE_DIR "
                             "or ~/.local/state/dptrain)")
    backup.set_defaults(handler=_cmd_backup)


def _cmd_backup(args: argparse.Namespace) -> int:
    from dptrain.coordinator.client.commands import default_state_dir
    from dptrain.coordinator.server.backup import BackupError, backup_state

    try:
        summary = backup_state(args.state_dir or default_state_dir(), args.destination)
    except BackupError as e:
        raise CommandError(str(e)) from None
    print(f"{summary.destination}: {summary.jobs} job(s), {summary.blobs} file(s), "
          f"{summary.bytes / 1e6:.1f} MB")
    return 0


def _add_proto_path_command(commands: argparse._SubParsersAction) -> None:
    proto_path = commands.add_parser(
        "proto-path", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="print the directory of the coordinator API's .proto files",
        description="Print the directory the gRPC API's .proto files are relative to\n"
                    "(dptrain/v1/coordinator.proto): the -I of protoc, grpcurl's -import-path,\n"
                    "or grpc-js proto-loader's includeDirs, for clients in other languages.",
        epilog="examples:\n  protoc -I \"$(dptrain proto-path)\" --cpp_out=. "
               "dptrain/v1/coordinator.proto\n"
               "  grpcurl -import-path \"$(dptrain proto-path)\" -proto "
               "dptrain/v1/coordinator.proto \\\n"
               "      -H \"authorization: Bearer $(cat ~/.local/state/dptrain/token)\" -plaintext "
               "127.0.0.1:50051 list\n")
    proto_path.set_defaults(handler=_cmd_proto_path)


def _cmd_proto_path(args: argparse.Namespace) -> int:
    from dptrain.protos import proto_path

    print(proto_path())
    return 0


def _cmd_tls_init(args: argparse.Namespace) -> int:
    from dptrain.coordinator.server.tls_init import init_tls, usage_lines

    try:
        files = init_tls(args.directory, args.host, force=args.force)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print("\n".join(usage_lines(files, args.host, args.port)))
    return 0


def _cmd_render_job(args: argparse.Namespace) -> int:
    # The manifest is a pure function on the server's side; it and what it imports are light
    # (no gRPC, no store), and nothing the job names is imported: the file is only read.
    import yaml

    from dptrain.coordinator.server.job_files import JobPaths
    from dptrain.coordinator.server.launchers.base import (
        WorkerLaunch,
        attempt_environment,
    )
    from dptrain.coordinator.server.launchers.kubernetes_manifest import (
        mpijob_manifest,
        settings_from_options,
    )
    from dptrain.worker.spec import JobSpecError, check_types, read_spec_file

    try:
        settings = settings_from_options(args)
    except ValueError as e:
        raise CommandError(str(e)) from None
    try:
        spec = read_spec_file(args.job)
    except JobSpecError as e:
        raise CommandError(str(e)) from None
    try:
        check_types(spec)  # the spec owner's types; nothing the job names is imported
    except JobSpecError as e:
        raise CommandError(f"{args.job}: {e}") from None
    workers = spec.get("workers", 1)
    if workers < 1:
        raise CommandError(f"{args.job}: workers: must be >= 1, got {workers!r}")
    address = args.coordinator or f"dptrain-coordinator.{settings.namespace}.svc:50051"
    run_id = f"{args.job_id}.1.00000000"  # a fixed marker: the same job renders the same
    env = attempt_environment({}, job_id=args.job_id, token="", run_id=run_id,
                              server_address=address, heartbeat_timeout=60.0)
    launch = WorkerLaunch(args.job_id, 1, run_id, (("pod", workers),),
                          JobPaths.of(Path(args.cluster_state_dir) / "jobs", args.job_id), env,
                          resume=False)
    print(yaml.safe_dump(mpijob_manifest(settings, launch), sort_keys=False), end="")
    return 0


# serve and demo run a server: this top layer may import both sides, the client commands may not.
def _cmd_serve(args: argparse.Namespace) -> int:
    from dptrain.coordinator.client.commands import default_state_dir
    from dptrain.coordinator.server.command import run_server

    args.state_dir = args.state_dir or default_state_dir()
    return run_server(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from dptrain.coordinator.demo import run_demo

    return run_demo(output=args.output, workers=args.workers)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dptrain`` console command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code (see ``dptrain --help``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # gRPC's core logs a failed TLS handshake at INFO on stderr; our one-line error says it
    # (and what to pass), so only its errors are shown unless the user asks for more.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # `dptrain run train.py -n 2 -- --lr 0.1`: what follows `--` is the script's, as it is.
    script_args: list[str] = []
    if "run" in argv and "--" in argv[argv.index("run"):]:
        cut = argv.index("--", argv.index("run"))
        argv, script_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if script_args:
        args.args = [*getattr(args, "args", []), *script_args]
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CommandError as e:
        print(f"dptrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        print(f"dptrain: error: {e.strerror or e}"
              + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 2
    except Exception as e:  # one line, never a traceback (DPTRAIN_DEBUG=1 shows it)
        return _report(e)


def _report(error: Exception) -> int:
    """Print an error of a coordinator command as one line; return its exit code."""
    from dptrain.coordinator.client.commands import EXIT_SERVER, EXIT_USAGE, exit_code_for

    client = sys.modules.get("dptrain.coordinator.client.client")
    if client is not None and isinstance(error, client.ClientError):
        code = exit_code_for(error)
    elif isinstance(error, (ValueError, RuntimeError)):  # configuration: ports, files, options
        code = EXIT_USAGE
    else:
        if os.environ.get("DPTRAIN_DEBUG"):
            raise error
        print(f"dptrain: internal error: {type(error).__name__}: "
              f"{' '.join(str(error).split())} (DPTRAIN_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_SERVER
    print(f"dptrain: error: {' '.join(str(error).split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

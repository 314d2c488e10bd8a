"""The coordinator's ``dptrain`` subcommands: ``serve``, the client commands and ``demo``.

`add_commands` adds them to the ``dptrain`` parser of `coordinator.cli` (beside ``run``).
Client commands connect with `connect`: the address from ``--address``, ``$DPTRAIN_ADDRESS``
or ``127.0.0.1:50051``; the token from ``--token-file``, ``$DPTRAIN_TOKEN``,
``$DPTRAIN_TOKEN_FILE`` or the state directory's ``token`` file (``--state-dir``,
``$DPTRAIN_STATE_DIR``, default ``~/.local/state/dptrain``, where ``dptrain serve`` keeps it);
TLS with ``--tls-ca`` or ``$DPTRAIN_TLS_CA``. ``dptrain user ...`` manages users through the
same client (an admin's token: from any host).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dptrain.coordinator.api.records import EventKind, JobState
from dptrain.coordinator.client.follow import (
    download_bar,
    events_now,
    final_summary,
    follow_job,
    format_event,
    format_job,
    format_metrics,
    format_table,
    plot_curves,
)

if TYPE_CHECKING:  # grpc is imported only by the commands that talk to a coordinator
    from dptrain.coordinator.client.client import Client, ClientError

__all__ = ["add_commands", "connect", "exit_code_for", "default_state_dir", "CLIENT_EXIT_CODES",
           "DEFAULT_ADDRESS", "DEFAULT_PORT", "EXIT_JOB_FAILED", "EXIT_USAGE", "EXIT_NOT_FOUND",
           "EXIT_UNREACHABLE", "EXIT_AUTH", "EXIT_SERVER"]

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
ADDRESS_ENV, STATE_DIR_ENV, TLS_CA_ENV = "DPTRAIN_ADDRESS", "DPTRAIN_STATE_DIR", "DPTRAIN_TLS_CA"

EXIT_JOB_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 1, 2, 4
EXIT_UNREACHABLE, EXIT_AUTH, EXIT_SERVER = 5, 6, 7
CLIENT_EXIT_CODES = f"""\
exit codes of the coordinator commands:
  0    done (submit --follow, watch: the job SUCCEEDED)
  {EXIT_JOB_FAILED}    the job FAILED, TIMED_OUT or was CANCELLED (submit --follow, watch)
  {EXIT_USAGE}    bad command line, job file or argument (INVALID_ARGUMENT, a local file)
  {EXIT_NOT_FOUND}    no such job or checkpoint (NOT_FOUND)
  {EXIT_UNREACHABLE}    cannot reach the coordinator (UNAVAILABLE, DEADLINE_EXCEEDED)
  {EXIT_AUTH}    not allowed (UNAUTHENTICATED, PERMISSION_DENIED): check the token
  {EXIT_SERVER}    another refusal or failure of the coordinator (FAILED_PRECONDITION, ...)
  130  interrupted (Ctrl-C)
"""
_CODE_EXITS = {"INVALID_ARGUMENT": EXIT_USAGE, "OUT_OF_RANGE": EXIT_USAGE,
               "NOT_FOUND": EXIT_NOT_FOUND, "UNAVAILABLE": EXIT_UNREACHABLE,
               "DEADLINE_EXCEEDED": EXIT_UNREACHABLE, "UNAUTHENTICATED": EXIT_AUTH,
               "PERMISSION_DENIED": EXIT_AUTH}


def exit_code_for(error: ClientError) -> int:
    """The exit code for a failed call (see `CLIENT_EXIT_CODES`)."""
    return _CODE_EXITS.get(error.code, EXIT_SERVER)


def default_state_dir() -> Path:
    """``$DPTRAIN_STATE_DIR``, else ``$XDG_STATE_HOME/dptrain``, else
    ``~/.local/state/dptrain``."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "dptrain"


def connect(args: argparse.Namespace, *, data_port: bool = True) -> Client:
    """A client for the coordinator the command line names (see the module docstring);
    `data_port` False: checkpoint bytes over the gRPC streams only."""
    from dptrain.coordinator.client.client import Client

    return Client(args.address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
                  tls_ca=args.tls_ca or os.environ.get(TLS_CA_ENV) or None,
                  token_file=args.token_file, state_dir=args.state_dir or default_state_dir(),
                  data_port=data_port)


def _data_port(text: str) -> int | str | None:
    """``dptrain serve --data-port``: a port number, ``off`` (None) or ``auto``."""
    if text in ("off", "auto"):
        return None if text == "off" else text
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535 or off, got {text!r}")
    return port


def _outcome(state: JobState) -> int:
    return 0 if state is JobState.SUCCEEDED else EXIT_JOB_FAILED


# ---------------------------------------------------------------- client commands

def _cmd_submit(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.submit_job(args.job, priority=args.priority,
                                max_restarts=args.max_restarts, time_limit=args.time_limit)
        if not args.follow:
            print(job.id)
            return 0
        print(f"submitted {job.id} ({job.name}), following it (Ctrl-C stops following, the "
              f"job goes on)", file=sys.stderr, flush=True)
        follow_job(client.watch_job(job.id))
        job = client.get_job(job.id)
        print(final_summary(job), flush=True)
        return _outcome(job.state)


def _cmd_jobs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        jobs = list(client.iter_jobs([JobState(s.upper()) for s in args.state or ()],
                                     owner=args.owner or ""))
    print(format_table(
        ["ID", "NAME", "OWNER", "STATE", "WORKERS", "PRIORITY", "STEP", "RESTARTS",
         "SUBMITTED"],
        [(j.id, j.name, j.owner, j.state.value, j.workers, j.priority,
          "-" if j.last_step is None else j.last_step, j.restarts,
          _short_time(j.submitted_at)) for j in jobs]))
    return 0


def _short_time(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as client:
        print(format_job(client.get_job(args.id)))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    with connect(args) as client:
        state = None
        for item in client.watch_job(args.id):
            if hasattr(item, "kind"):
                print(format_event(item), flush=True)
                if item.kind is EventKind.STATE:
                    state = JobState(item.payload["state"])
            else:
                state = item.state
                print(f"job {item.id} ({item.name}) {item.state.value}"
                      + (f" at step {item.last_step}" if item.last_step is not None else ""),
                      flush=True)
        return _outcome(state) if state is not None else EXIT_SERVER


def _cmd_logs(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        for event in events_now(client, args.id, follow=args.follow):
            if event.kind is EventKind.LOG:
                print(event.payload.get("line", ""), flush=args.follow)
    finally:
        client.close()
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    with connect(args) as client:
        job = client.cancel_job(args.id)
        print(f"{job.id} {job.state.value}", flush=True)
        if not args.wait or job.state.terminal:
            return 0
        # CANCELLING: the workers are stopping; their final checkpoint is stored before the
        # job is CANCELLED, so `dptrain checkpoints` lists it once this returns.
        for _ in client.watch_job(job.id):
            pass
        job = client.get_job(job.id)
    print(f"{job.id} {job.state.value}: {job.error}" if job.error else f"{job.id} "
          f"{job.state.value}")
    return 0


def _cmd_checkpoints(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for step, keep in ((args.keep, True), (args.unkeep, False)):
            if step is not None:
                client.keep_checkpoint(args.id, step, keep)
        records = client.list_checkpoints(args.id)
    print(format_table(
        ["STEP", "SIZE", "CREATED", "SHA256", "KEPT", "METRICS"],
        [(r.step, f"{r.size / 1e3:.1f} kB", _short_time(r.created_at), r.sha256[:16],
          "keep" if r.keep else "-", format_metrics(r.manifest.get("metrics", {})) or "-")
         for r in records]))
    return 0


def _positive_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        days = float("nan")
    if not days > 0 or days == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of days > 0, got {text!r}")
    return days


def _cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"dptrain delete: refusing to delete {args.id} without --yes (no terminal "
                  "to ask)", file=sys.stderr)
            return EXIT_USAGE
        answer = input(f"delete job {args.id}, its logs and its checkpoints for good? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return EXIT_USAGE
    with connect(args) as client:
        job = client.delete_job(args.id)
    print(f"{job.id} deleted")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    with connect(args, data_port=args.data_port) as client, download_bar() as progress:
        got = client.download_checkpoint(args.id, step=args.step, file=args.file,
                                         dest=args.output, on_progress=progress)
    print(f"{got.path}: {got.name} of step {got.step}, {got.size} bytes, {got.algorithm} "
          f"{got.digest}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    client = connect(args)
    try:
        job = client.get_job(args.id)
        events = list(events_now(client, args.id))
    finally:
        client.close()
    points = plot_curves(events, args.output, title=f"{job.name} ({job.id}, {job.state.value})")
    print(f"{args.output}: loss and accuracy of {job.id} over {points} step(s)")
    return 0


# ---------------------------------------------------------------- dptrain user

def _hand_over(token: str, out: str | None, name: str) -> None:
    """Give a new token to the admin: into `out` (a token file), else on stdout, with no
    newline when stdout is a file (``> bob.token`` makes a token file every client reads)."""
    from dptrain.coordinator.api.credentials import write_token_file

    if out is not None:
        write_token_file(out, token)
        print(f"{out}: the token of user {name} (mode 0600; it is shown nowhere else)")
        return
    print(f"the token of user {name} (it is shown nowhere else):", file=sys.stderr)
    sys.stdout.write(token + ("\n" if sys.stdout.isatty() else ""))
    sys.stdout.flush()


def _cmd_user_add(args: argparse.Namespace) -> int:
    with connect(args) as client:
        user, token = client.create_user(args.name, admin=args.admin)
    _hand_over(token, args.out, user.name)
    return 0


def _cmd_user_token(args: argparse.Namespace) -> int:
    with connect(args) as client:
        user, token = client.issue_token(args.name)
    _hand_over(token, args.out, user.name)
    return 0


def _cmd_user_revoke(args: argparse.Namespace) -> int:
    with connect(args) as client:
        user = client.revoke_user(args.name)
    print(f"{user.name} revoked: its token is refused from now on (its jobs stay; "
          f"dptrain user token {user.name} issues a new one)")
    return 0


def _cmd_user_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        users = client.list_users()
    print(format_table(["NAME", "ROLE", "TOKEN", "CREATED"],
                       [(u.name, "admin" if u.admin else "user",
                         "active" if u.active else "revoked", _short_time(u.created_at))
                        for u in users]))
    return 0


def _add_user_commands(commands: Any, fmt: type, epilog: str) -> None:
    """``dptrain user add|token|revoke|list``: admins only, from any host (through the API)."""
    user = commands.add_parser(
        "user", help="manage the coordinator's users and their tokens (admins)",
        description="Manage the coordinator's users and their tokens (an admin's token\n"
                    "only). A user submits jobs and acts on its own jobs; an admin on\n"
                    "every job and on users. A new or revoked token takes effect at the\n"
                    "next call, without a restart. See docs/operations.md, Users and roles.",
        formatter_class=fmt, epilog=epilog)
    _connection_options(user, suppress=True)
    actions = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)

    def action(name: str, handler: Any, help_text: str, example: str) -> Any:
        parser = actions.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=fmt,
                                    epilog=f"example:\n  {example}\n\n{epilog}")
        _connection_options(parser, suppress=True)
        parser.set_defaults(handler=handler)
        return parser

    add = action("add", _cmd_user_add, "create a user and print its first token",
                 "dptrain user add alice --out alice.token")
    add.add_argument("name", metavar="NAME",
                     help="1-64 of a-z 0-9 . _ -, starting with a letter")
    add.add_argument("--admin", action="store_true",
                     help="an admin: acts on every job and manages users")
    token = action("token", _cmd_user_token, "print a new token for a user; its previous "
                   "token stops working (a revoked user is active again)",
                   "dptrain user token alice > alice.token")
    token.add_argument("name", metavar="NAME", help="the user")
    for parser in (add, token):
        parser.add_argument("--out", metavar="FILE", default=None,
                            help="write the token to FILE (mode 0600, no trailing newline) "
                                 "instead of printing it")
    action("revoke", _cmd_user_revoke, "revoke a user's token (the user and its jobs stay)",
           "dptrain user revoke alice").add_argument("name", metavar="NAME", help="the user")
    action("list", _cmd_user_list, "list the users, their role and whether their token is "
           "active", "dptrain user list")


# ---------------------------------------------------------------- the parser

def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--address, --token-file, --tls-ca and --state-dir; on subcommands their default is
    SUPPRESS so a value given before the subcommand survives."""
    default: Any = argparse.SUPPRESS if suppress else None
    group = parser.add_argument_group("connection")
    group.add_argument("--address", metavar="HOST:PORT", default=default,
                       help=f"the coordinator (default: ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")
    group.add_argument("--token-file", metavar="FILE", default=default,
                       help="file holding your token (default: $DPTRAIN_TOKEN, "
                            "$DPTRAIN_TOKEN_FILE, or STATE_DIR/token, the built-in admin's)")
    group.add_argument("--tls-ca", metavar="PEM", default=default,
                       help=f"CA certificate to verify the coordinator's TLS with (default: "
                            f"${TLS_CA_ENV}; none: plaintext)")
    group.add_argument("--state-dir", metavar="DIR", default=default,
                       help=f"the coordinator's state directory (default: ${STATE_DIR_ENV} or "
                            f"~/.local/state/dptrain)")


def add_kubernetes_options(parser: argparse.ArgumentParser) -> None:
    """The kubernetes launcher's options, shared by ``dptrain serve --launcher kubernetes`` and
    ``dptrain render-job`` (``server.launchers.kubernetes_manifest.settings_from_options``
    reads them)."""
    group = parser.add_argument_group("kubernetes launcher (one MPIJob per job attempt; see "
                                      "docs/deploy.md)")
    group.add_argument("--image", metavar="IMAGE",
                       help="the workers' container image (built from deploy/Dockerfile)")
    group.add_argument("--namespace", default="default", metavar="NS",
                       help="the namespace of the MPIJobs (default 'default')")
    group.add_argument("--state-claim", default="dptrain-state", metavar="PVC",
                       help="the ReadWriteMany PersistentVolumeClaim holding the coordinator's "
                            "state directory; pods mount their job's directory from it "
                            "(default dptrain-state)")
    group.add_argument("--slots-per-worker", type=int, default=1, metavar="N",
                       help="ranks per worker pod (default 1)")
    group.add_argument("--tls-secret", metavar="NAME",
                       help="the Secret holding the CA certificate (key ca.pem) the workers "
                            "verify the coordinator with; needed when it serves TLS")
    group.add_argument("--cpu-per-rank", metavar="CPU",
                       help="CPU request and limit per rank, e.g. 1 or 500m (default: none)")
    group.add_argument("--memory-per-rank", metavar="MEM",
                       help="memory request and limit per rank, e.g. 2Gi (default: none)")


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection options to the top-level ``dptrain`` parser."""
    _connection_options(parser, suppress=False)


def add_commands(commands: Any, serve: Callable[[argparse.Namespace], int],
                 demo: Callable[[argparse.Namespace], int]) -> None:
    """Add ``serve``, the client commands and ``demo`` to the ``dptrain`` subparsers.

    Args:
        commands: the ``add_subparsers()`` object of the ``dptrain`` parser.
        serve: the handler of ``dptrain serve`` (it runs the server, so the CLI's top layer
            provides it: this client module never imports the server).
        demo: the handler of ``dptrain demo`` (likewise: an embedded server and a client).
    """
    fmt = argparse.RawDescriptionHelpFormatter

    def add(name: str, handler: Any, help_text: str, epilog: str = "") -> Any:
        parser = commands.add_parser(name, help=help_text, description=help_text,
                                     formatter_class=fmt, epilog=epilog + CLIENT_EXIT_CODES)
        _connection_options(parser, suppress=True)
        parser.set_defaults(handler=handler)
        return parser

    serve_parser = add("serve", serve, "run the coordinator: a gRPC job service that schedules "
                "jobs on this machine's cores or a hostfile's hosts",
                "It creates the state directory and what it holds (jobs, logs, checkpoints,\n"
                "the token) private to this user: directories 0700, files 0600, whatever the\n"
                "umask.\n\n"
                "examples:\n  dptrain serve --state-dir /var/lib/dptrain --slots 8\n"
                "  dptrain serve --launcher slurm --partition gpu --account proj "
                "--sbatch-arg=--time=4:00:00\n\n")
    serve_parser.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; beyond loopback only "
                            "with TLS or --insecure)")
    serve_parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    serve_parser.add_argument("--slots", type=int, default=None,
                       help="worker ranks that may run at once on this machine (default: "
                            "one per core)")
    serve_parser.add_argument("--hostfile", metavar="FILE",
                       help="hosts and their slots: one 'host', 'host:N' or 'host slots=N' "
                            "per line (# comments); see docs/deploy.md")
    serve_parser.add_argument("--launcher-exec", metavar="CMD", default=None,
                       help="the remote shell that starts ranks on the hostfile's other hosts "
                            "(mpiexec's -launcher-exec, called like ssh: CMD -x HOST "
                            "'command'; default ssh); the preflight uses it too")
    serve_parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate")
    serve_parser.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve_parser.add_argument("--insecure", action="store_true",
                       help="allow plaintext on a non-loopback address")
    serve_parser.add_argument("--data-root", metavar="DIR", action="append", default=[],
                       help="directory job data files may come from (repeatable)")
    serve_parser.add_argument("--allow-module", metavar="PREFIX", action="append", default=[],
                       help="installed modules under this dotted prefix (mylab allows "
                            "mylab.models:build, not mylabx:f) that jobs' "
                            "package.module:function may name, besides their shipped code "
                            "and the model zoo (repeatable; default: none)")
    serve_parser.add_argument("--metrics-port", type=int, default=None,
                       help="serve Prometheus metrics on this port")
    serve_parser.add_argument("--data-port", type=_data_port, default="auto", metavar="N|off",
                              help="the port checkpoint bytes travel over beside gRPC (plain "
                                   "TCP; TLS with --tls-cert; a firewall must let it through "
                                   "as it does the gRPC port); default the gRPC port + 1; off: "
                                   "transfers use the gRPC streams")
    serve_parser.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="S",
                       help="seconds without training progress (the workers heartbeat only "
                            "while steps advance) before a running job counts as failed; "
                            "set it above the longest step (default 60; 0: never)")
    serve_parser.add_argument("--retain-finished", type=_positive_days, default=None,
                              metavar="DAYS",
                              help="delete finished jobs (records, logs, checkpoints but the "
                                   "files other jobs use) DAYS days after they finished, "
                                   "checked at start and hourly; fractions allowed (default: "
                                   "keep them)")
    serve_parser.add_argument("--max-restarts", type=int, default=3,
                       help="restarts of jobs submitted without max_restarts (default 3)")
    serve_parser.add_argument("--advertise-address", metavar="HOST:PORT",
                       help="the address workers reach the coordinator at (default: from "
                            "--host)")
    serve_parser.add_argument("--launcher", choices=["mpiexec", "slurm", "kubernetes"],
                              default="mpiexec",
                              help="what starts each job's ranks: mpiexec on this machine or "
                                   "the hostfile's hosts (default); slurm: one sbatch job per "
                                   "attempt (srun --mpi=pmi2), with --slots defaulting to the "
                                   "partition's CPUs; kubernetes: one Kubeflow MPIJob per "
                                   "attempt")
    serve_parser.add_argument("--partition", metavar="P",
                              help="Slurm partition for the jobs (default: Slurm's default)")
    serve_parser.add_argument("--account", metavar="A", help="Slurm account to charge")
    serve_parser.add_argument("--sbatch-arg", metavar="ARG", action="append", default=[],
                              help="one more #SBATCH option, e.g. --sbatch-arg=--time=2:00:00 "
                                   "(repeatable)")
    add_kubernetes_options(serve_parser)

    submit = add("submit", _cmd_submit, "submit a job file to the coordinator",
                 "examples:\n  dptrain submit examples/digits_mlp.yaml --follow\n"
                 "  id=$(dptrain submit job.yaml --priority 5)\n\n")
    submit.add_argument("job", metavar="JOB.yaml",
                        help="the job file (.yaml, .yml, .json); its code: directory (relative "
                             "to it) is packed and uploaded with the job")
    submit.add_argument("--follow", "-f", action="store_true",
                        help="show a progress bar until the job ends, then its final metrics")
    submit.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    submit.add_argument("--max-restarts", type=int, default=None,
                        help="restarts after worker failures (default: the server's)")
    submit.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="seconds per run (at most 366 days), which lets smaller jobs "
                             "backfill; a run past it is stopped (its workers checkpoint) "
                             "and the job ends TIMED_OUT")

    jobs = add("jobs", _cmd_jobs, "list jobs, newest first: your own (an admin's: everyone's)")
    jobs.add_argument("--state", action="append", metavar="STATE",
                      choices=[s.value for s in JobState] + [s.value.lower() for s in JobState],
                      help="only jobs in this state (repeatable)")
    jobs.add_argument("--owner", metavar="USER", default=None,
                      help="only this user's jobs (another user's: admins only)")
    for name, handler, text in (("status", _cmd_status, "show one job"),
                                ("watch", _cmd_watch, "print a job's events until it ends")):
        add(name, handler, text).add_argument("id", metavar="ID", help="the job's id")
    cancel = add("cancel", _cmd_cancel, "cancel a job: a queued one at once; a running one is "
                 "CANCELLING while its workers finish their step and checkpoint (the "
                 "checkpoint is stored), then CANCELLED")
    cancel.add_argument("id", metavar="ID", help="the job's id")
    cancel.add_argument("--wait", action="store_true",
                        help="wait until the job is CANCELLED (its final checkpoint stored)")
    listing = add("checkpoints", _cmd_checkpoints, "list a job's checkpoints (KEPT: marked to "
                  "be kept)", "example:\n  dptrain checkpoints j-0123456789ab --keep 500\n\n")
    listing.add_argument("id", metavar="ID", help="the job's id")
    listing.add_argument("--keep", type=int, metavar="STEP",
                         help="first mark the checkpoint at STEP kept: retention (the job's "
                              "checkpoint.keep newest) never deletes it")
    listing.add_argument("--unkeep", type=int, metavar="STEP",
                         help="first remove the mark of the checkpoint at STEP")
    delete = add("delete", _cmd_delete, "delete a finished job: its record, logs and the "
                 "checkpoint and code files no other job uses")
    delete.add_argument("id", metavar="ID", help="the job's id")
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask first")
    logs = add("logs", _cmd_logs, "print a job's log lines")
    logs.add_argument("id", metavar="ID", help="the job's id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until it ends")
    download = add("download", _cmd_download, "download a checkpoint file (its digest verified)",
                   "An interrupted download resumes from the bytes kept (a hidden .part file\n"
                   "beside the output), in the same call or when run again; the whole file\n"
                   "is verified at the end.\n\n"
                   "example:\n  dptrain download j-0123456789ab -o model.safetensors\n\n")
    download.add_argument("id", metavar="ID", help="the job's id")
    download.add_argument("--step", type=int, default=None,
                          help="the checkpoint's step (default: the newest intact one)")
    download.add_argument("--file", default="model.safetensors",
                          help="model.safetensors (default), optimizer.safetensors or "
                               "manifest.json")
    download.add_argument("-o", "--output", default=None, metavar="PATH",
                          help="where to write it (default: FILE in the current directory)")
    download.add_argument("--no-data-port", dest="data_port", action="store_false",
                          help="fetch the bytes over the gRPC stream even where the "
                               "coordinator has a data port")
    plot = add("plot", _cmd_plot, "draw a job's loss and accuracy curves into a PNG")
    plot.add_argument("id", metavar="ID", help="the job's id")
    plot.add_argument("-o", "--output", default="curves.png", metavar="PNG",
                      help="the image (default curves.png)")
    _add_user_commands(commands, fmt, CLIENT_EXIT_CODES)
    demo_parser = add("demo", demo, "train the digits MLP through an embedded coordinator on "
               "2 worker processes, then download its parameters")
    demo_parser.add_argument("-o", "--output", default="digits-mlp.safetensors", metavar="PATH",
                      help="where the trained parameters go (default digits-mlp.safetensors)")
    demo_parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")

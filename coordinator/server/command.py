"""``dptrain serve``: the coordinator as a long-running command (the CLI's top layer calls
`run_server`; the client side never imports this)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from dptrain.coordinator.api.credentials import read_token_file
from dptrain.coordinator.server.launchers.base import Launcher
from dptrain.coordinator.server.launchers.kubernetes_manifest import settings_from_options
from dptrain.coordinator.server.launchers.mpiexec import MpiexecLauncher
from dptrain.coordinator.server.launchers.slurm import SlurmLauncher, partition_cpus
from dptrain.coordinator.server.retention import DAY_S
from dptrain.coordinator.server.runner_settings import RunnerSettings
from dptrain.coordinator.server.scheduler import Cluster
from dptrain.coordinator.server.server import DATA_PORT_AUTO, ServerSettings, is_loopback, serve
from dptrain.worker.hostfile import LOCAL_HOSTS

__all__ = ["run_server", "unreachable_note", "root_note", "launcher_and_cluster"]

#: ``serve`` options that only the Slurm launcher takes (argparse dest -> option).
_SLURM_OPTIONS = {"partition": "--partition", "account": "--account",
                  "sbatch_arg": "--sbatch-arg"}


def unreachable_note(cluster: Cluster, host: str, advertise_address: str | None) -> str | None:
    """The warning for a coordinator that schedules on other hosts while its workers could
    reach it only on this machine (a loopback address and nothing advertised), else None.

    Args:
        cluster: the hosts it schedules on.
        host: the address it listens on (``--host``).
        advertise_address: the address workers are told (``--advertise-address``).
    """
    remote = [h.name for h in cluster.hosts if h.name not in LOCAL_HOSTS]
    if not remote or not is_loopback(host) or advertise_address:
        return None
    return (f"the hostfile names other hosts ({', '.join(remote)}) but the coordinator "
            f"listens on {host}, which their ranks cannot reach: give --host (with "
            f"--tls-cert/--tls-key, see dptrain tls init) or the workers report nothing")


def root_note(euid: int | None = None) -> str | None:
    """The warning for a coordinator started as root, else None: the workers it starts on
    this machine run as its user, and so does every job's code.

    Args:
        euid: the effective user id (default: this process's).
    """
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return None
    return ("running as root, so jobs' code runs as root on the workers it starts; run the "
            "coordinator as an unprivileged user (docs/deploy.md)")


def launcher_and_cluster(args: argparse.Namespace) -> tuple[Launcher, Cluster]:
    """The launcher ``serve``'s options choose, and the slots the scheduler hands out.

    ``--launcher mpiexec`` (the default) runs ranks on this machine's cores (``--slots``) or a
    hostfile's hosts. ``--launcher slurm`` submits each attempt to Slurm, which places the
    ranks; the scheduler then sees one pool named ``slurm`` of ``--slots`` ranks, by default
    every CPU of the partition (``sinfo``): the coordinator never submits more ranks at once.
    ``--launcher kubernetes`` runs each attempt as an MPIJob; the scheduler sees one pool of
    ``--slots`` ranks (required: the coordinator's own cores say nothing of the cluster's).

    Raises:
        ValueError: options that do not go together, naming them.
        LaunchError: the launcher cannot work here (e.g. a missing package).
    """
    launcher = getattr(args, "launcher", "mpiexec")
    given = [option for dest, option in _SLURM_OPTIONS.items() if getattr(args, dest, None)]
    if given and launcher != "slurm":
        raise ValueError(f"{given[0]}: only with --launcher slurm (got --launcher {launcher})")
    if launcher == "slurm":
        if args.hostfile:
            raise ValueError("--hostfile: Slurm places the ranks; give --slots (or nothing: "
                             "the partition's CPUs) with --launcher slurm")
        slurm = SlurmLauncher(partition=args.partition, account=args.account,
                              sbatch_args=tuple(args.sbatch_arg or ()))
        slots = args.slots if args.slots is not None else partition_cpus(args.partition)
        return slurm, Cluster.local(slots, host="slurm")
    if launcher == "kubernetes":
        if args.hostfile:
            raise ValueError("--hostfile: the kubernetes launcher places ranks in worker pods; "
                             "give --slots, the ranks that may run at once in the cluster")
        if args.slots is None:
            raise ValueError("--slots: with --launcher kubernetes, give how many ranks may run "
                             "at once in the cluster (the coordinator's own cores say nothing "
                             "of it)")
        if args.tls_cert and not args.tls_secret:
            raise ValueError("--tls-secret: the coordinator serves TLS, so the worker pods "
                             "need its CA certificate: name the Secret that holds it (key "
                             "ca.pem, as `dptrain tls init` names it)")
        from dptrain.coordinator.server.launchers.kubernetes import KubernetesLauncher

        return KubernetesLauncher(settings_from_options(args)), Cluster.local(args.slots)
    if args.slots is not None and args.hostfile:
        raise ValueError("give --slots or --hostfile, not both")
    cluster = (Cluster.from_hostfile(args.hostfile) if args.hostfile
               else Cluster.local(args.slots))
    return MpiexecLauncher(launcher_exec=args.launcher_exec), cluster


def run_server(args: argparse.Namespace) -> int:
    """``dptrain serve``: run the coordinator until SIGINT or SIGTERM, then stop it gracefully
    (running jobs checkpoint and resume at the next start).

    Args:
        args: the parsed ``serve`` options; ``args.state_dir`` already resolved.

    Returns:
        The exit code (0).
    """
    launcher, cluster = launcher_and_cluster(args)
    state_dir = Path(args.state_dir)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for note in (root_note(), unreachable_note(cluster, args.host, args.advertise_address)):
        if note is not None:
            print(f"dptrain coordinator: warning: {note}", file=sys.stderr, flush=True)
    server = serve(ServerSettings(
        state_dir, args.host, args.port,
        token=read_token_file(args.token_file) if args.token_file else None,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, insecure=args.insecure,
        data_roots=args.data_root, allowed_modules=args.allow_module,
        metrics_port=args.metrics_port, cluster=cluster,
        data_port=DATA_PORT_AUTO if args.data_port == "auto" else args.data_port,
        default_max_restarts=args.max_restarts, advertise_address=args.advertise_address,
        runner=RunnerSettings(state_dir, launcher=launcher,
                              heartbeat_timeout=args.heartbeat_timeout or None),
        retain_finished_s=None if args.retain_finished is None
        else args.retain_finished * DAY_S))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    token_note = args.token_file or state_dir / "token"
    print(f"dptrain coordinator listening on {server.address} (data port "
          f"{server.data_port or 'off'}) with {cluster.capacity} slot(s) "
          f"(state {state_dir}, token in {token_note}); Ctrl-C stops it", file=sys.stderr,
          flush=True)
    while not stop.wait(0.5):
        pass
    print("dptrain coordinator: stopping (running jobs checkpoint and resume at the next "
          "start)", file=sys.stderr, flush=True)
    server.stop(grace=5.0)
    return 0

"""Coordinator benchmark: RPC latency under load, watch fan-out, checkpoint transfer rates.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/coordinator.py

The coordinator runs in a child process (a real gRPC server on loopback with its SQLite store,
no runner: submitted jobs stay queued), so its threads do not share a GIL with the clients.
Clients run in further child processes, many threads each, one connection per client. Rows:

1. RPC throughput with 50 concurrent clients (2 processes x 25 threads) each making its calls
   back to back: the standard health Check, GetJob, ListJobs (a page of 10 jobs) and SubmitJob
   of the coordinator, and a bare grpcio echo server in the same child process (a generic
   handler returning the request's bytes: gRPC's own cost per call). Each row's ratio is its
   calls per second over the same server's health Check, which passes the same interceptors
   (metrics, auth) as the job RPCs; the phases run round after round, interleaved, and each
   row's ratio is the median over the rounds of its ratio in that round. The clients call
   raw stubs with pre-built requests, so all rows spend the same client CPU per call
   (decoding a reply with ``api.serde.job_from_proto`` would share the 2 cores with the
   server). Beside the throughput, the server's CPU per call: the server process's user +
   system time (``/proc/<pid>/stat``) across each phase over its calls, and its ratio to the
   health Check's in the same round. Unlike throughput, it does not depend on how many idle
   cores the machine has, so it is the measure to optimise the job RPCs against. And the
   server's context switches per call (all its threads, ``/proc/<pid>/task/*/status``): most
   are threads waiting for the GIL.
2. WatchJob fan-out: 200 watchers (4 processes x 50 threads) follow one RUNNING job; the
   benchmark sends a log line as the job's worker (ReportProgress with its worker token) and
   times until every watcher has it (and until half have it). Median over rounds.
3. Checkpoint transfer: a worker uploads a checkpoint whose model file is 64 MiB of random
   bytes, different in each round (verified against its BLAKE3 manifest entry and stored
   durably; retention deletes the oldest from the fourth round on), and a client downloads
   that file (verified as it arrives, written with fsync), and again in byte ranges over two
   connections (``streams=2``; the two downloads swap places every round, as the first follows
   the upload's write-back). The ``upload``/``download`` rows are the default path, the
   coordinator's data port (OpenCheckpointUpload or DownloadCheckpoint hands out a ticket, the
   bytes go over plain TCP: ``sendfile`` on the sending side, ``recv`` into the hasher and the
   writer on the receiving side); the ``gRPC stream`` rows are the same transfers forced onto
   the gRPC streams (``data_port=False``: UploadCheckpoint, DownloadCheckpoint's chunks). Peers:
   a plain copy of the same file on the same disk (``shutil.copyfile`` then ``fsync``: both
   transfers make their result durable too) and, for reference, the copy without fsync; the
   ceiling of the data port: the same bytes over a bare TCP socket on loopback to and from the
   server's process (``sendfile`` → ``recv`` + write + fsync, no hashing, no tickets); the
   ceiling gRPC itself sets: the same bytes in the same chunks over a bare grpcio stream (a
   generic handler in the echo server, raw bytes per message, no hashing), each way, dropped
   on arrival and written + fsynced. Every row runs once per round, interleaved; medians over
   rounds. With ``--tls`` (and ``--only transfer``) the coordinator serves TLS, gRPC and its
   data port alike, with a certificate for ``localhost`` (``dptrain tls init``'s), and the
   transfer rows go over TLS; the bare peers stay plaintext.

Every row's peers are measured in this one run; the machine may be shared, so each number is
a median (or a percentile over thousands of calls) and the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SPEC = {"name": "bench", "model": {"name": "mlp", "args": {"in_features": 64, "hidden": [32],
                                                           "num_classes": 10}},
        "dataset": {"name": "digits"}, "optimizer": {"name": "adam", "lr": 0.001},
        "batch_size": 32, "max_steps": 10, "workers": 1}


# ---------------------------------------------------------------- the server (child process)

def serve_child(state_dir: str, worker_token: str, tls: bool = False) -> None:
    """Start a coordinator with one RUNNING job whose worker token is `worker_token`, and a
    bare echo server; print ``{"address", "token", "job_id", "echo", "tls_ca"}`` as JSON;
    stop when stdin closes. With `tls`, the coordinator serves TLS (gRPC and its data port)
    with a certificate for ``localhost`` made here (``tls_ca``: its CA)."""
    from concurrent import futures

    import grpc

    from dptrain.coordinator.api.limits import channel_options
    from dptrain.coordinator.api.records import JobState, hash_token, new_job
    from dptrain.coordinator.server.scheduler import Cluster
    from dptrain.coordinator.server.server import ServerSettings, serve
    from dptrain.coordinator.server.store import SqliteStore

    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with SqliteStore(Path(state_dir) / "coordinator.db") as store:
        job = store.create_job(new_job("watched", SPEC, token_hash=hash_token(worker_token)))
        store.transition(job.id, JobState.QUEUED, JobState.RUNNING, placement={"localhost": 1})
    files = None
    if tls:
        from dptrain.coordinator.server.tls_init import init_tls

        files = init_tls(Path(state_dir) / "tls", ["localhost"])
    server = serve(ServerSettings(state_dir, cluster=Cluster.local(64), max_workers=600,
                                  tls_cert=files and files.cert, tls_key=files and files.key,
                                  tls_ca=files and files.ca))
    # The peer: gRPC alone, with the coordinator's thread pool size and channel options.
    echo = grpc.server(futures.ThreadPoolExecutor(max_workers=600),
                       options=[*channel_options(), ("grpc.so_reuseport", 0)])
    echo.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, _: request)})])
    echo.add_generic_rpc_handlers([bare_transfer_handlers(Path(state_dir))])
    echo_port = echo.add_insecure_port("127.0.0.1:0")
    echo.start()
    sock_port = bare_socket_server(Path(state_dir))
    address = f"localhost:{server.port}" if tls else server.address  # the certificate's name
    print(json.dumps({"address": address, "token": server.token, "job_id": job.id,
                      "tls_ca": files and str(files.ca),
                      "echo": f"127.0.0.1:{echo_port}", "socket": sock_port,
                      "pid": os.getpid()}), flush=True)
    sys.stdin.read()
    echo.stop(grace=1.0)
    server.stop(grace=1.0)


def bare_socket_server(work: Path) -> int:
    """The data port's peer: a bare TCP listener on loopback (in the server's process, on a
    thread of its own). A connection sends ``u`` or ``d`` and a size (8 bytes): ``u``, then that
    many bytes, which are received in 1 MiB reads, written to a file and fsynced before the
    size is sent back; ``d``: that many bytes are ``sendfile``d from a file. No hashing, no
    tickets. Returns the port."""
    import socket

    from dptrain.coordinator.api.limits import CHUNK_BYTES

    listener = socket.create_server(("127.0.0.1", 0))
    source = work / "bare-source"

    def serve_one(conn: socket.socket) -> None:
        with conn:
            head = conn.recv(9, socket.MSG_WAITALL)
            op, size = head[:1], int.from_bytes(head[1:], "little")
            if op == b"u":
                left = size
                with open(work / "bare-socket-upload", "wb") as f:
                    while left and (data := conn.recv(min(CHUNK_BYTES, left))):
                        f.write(data)
                        left -= len(data)
                    f.flush()
                    os.fsync(f.fileno())
                conn.sendall(size.to_bytes(8, "little"))
            else:
                if not source.exists() or source.stat().st_size != size:
                    source.write_bytes(os.urandom(size))
                with open(source, "rb") as f:
                    conn.sendfile(f, 0, size)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def bare_transfer_handlers(work: Path) -> Any:
    """The transfer peers: a file's bytes over a bare grpcio stream, each message one chunk as
    it is (no protobuf, no hashing), received and dropped or written and fsynced.

    ``bench.Transfer/Sink`` and ``SinkToDisk`` take a client's stream (as an upload does) and
    answer the byte count; ``Source`` streams the requested number of bytes to the client (as
    a download does), in chunks of the transfers' size.
    """
    import grpc

    from dptrain.coordinator.api.limits import CHUNK_BYTES

    chunk = os.urandom(CHUNK_BYTES)

    def sink(requests: Any, _: Any) -> bytes:
        return sum(len(r) for r in requests).to_bytes(8, "little")

    def sink_to_disk(requests: Any, _: Any) -> bytes:
        size = 0
        with open(work / "bare-upload", "wb") as f:
            for r in requests:
                size += f.write(r)
            f.flush()
            os.fsync(f.fileno())
        return size.to_bytes(8, "little")

    def source(request: bytes, _: Any) -> Any:
        left = int.from_bytes(request, "little")
        while left > 0:
            yield chunk if left >= len(chunk) else chunk[:left]
            left -= len(chunk)

    return grpc.method_handlers_generic_handler("bench.Transfer", {
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
        "SinkToDisk": grpc.stream_unary_rpc_method_handler(sink_to_disk),
        "Source": grpc.unary_stream_rpc_method_handler(source)})


# ---------------------------------------------------------------- load (child processes)

RPCS = ("Check", "Echo", "GetJob", "ListJobs", "SubmitJob")
"""The rows of the throughput table, in the order each round calls them."""


def _callers(info: dict) -> tuple[Any, dict[str, Any]]:
    """One client's connections and ``{rpc: () -> reply}`` for each of `RPCS`: raw stubs with
    pre-built requests, so that every row costs the client the same."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from dptrain.coordinator.api import serde
    from dptrain.coordinator.api.credentials import bearer_metadata
    from dptrain.coordinator.api.limits import channel_options
    from dptrain.protos.dptrain.v1 import coordinator_pb2 as pb
    from dptrain.protos.dptrain.v1 import coordinator_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(info["address"], options=channel_options())
    echo_channel = grpc.insecure_channel(info["echo"], options=channel_options())
    stub, health = pb_grpc.CoordinatorStub(channel), health_pb2_grpc.HealthStub(channel)
    echo = echo_channel.unary_unary("/bench.Echo/Echo")
    metadata = bearer_metadata(info["token"], None)
    get = pb.GetJobRequest(job_id=info["job_id"])
    listing = pb.ListJobsRequest(page_size=10)
    submit = serde.submit_request_to_proto(SPEC)
    check = health_pb2.HealthCheckRequest()
    echo_bytes = get.SerializeToString()
    calls = {
        "Check": lambda: health.Check(check, timeout=60),
        "Echo": lambda: echo(echo_bytes, timeout=60),
        "GetJob": lambda: stub.GetJob(get, metadata=metadata, timeout=60),
        "ListJobs": lambda: stub.ListJobs(listing, metadata=metadata, timeout=60),
        "SubmitJob": lambda: stub.SubmitJob(submit, metadata=metadata, timeout=60),
    }
    return (channel, echo_channel), calls


def process_cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far, all its threads (Linux ``/proc``)."""
    # The fields after the command name (which may hold spaces) start at the state, field 3;
    # utime and stime are fields 14 and 15, in clock ticks.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_switches(pid: int) -> int:
    """A process's context switches so far (voluntary and involuntary), all its threads:
    each is a thread that blocked or was preempted, most often waiting for the GIL."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile: its switches are gone from the count
            continue
        total += sum(int(line.split()[1]) for line in status.splitlines()
                     if "ctxt_switches:" in line)
    return total


def load_child(info: dict, threads: int, calls: int, rounds: int, start: Any,
               out: Any, measure_cpu: bool) -> None:
    """`threads` clients, each making `calls` calls of each of `RPCS` per round; put the
    latencies (seconds), the wall time and (when `measure_cpu`) the server's CPU seconds and
    context switches of each phase of each round on `out`. `start` is a barrier shared with
    the other load processes, passed before and after each phase."""
    clients = [_callers(info) for _ in range(threads)]
    for _, c in clients:
        for rpc in RPCS:
            c[rpc]()  # connect (and warm up) before timing
    result: dict[str, list] = {rpc: [] for rpc in RPCS}
    for _ in range(rounds):
        for rpc in RPCS:
            latencies: list[float] = []
            lock = threading.Lock()
            barrier = threading.Barrier(threads + 1)

            def work(call: Any, latencies: list = latencies, lock: threading.Lock = lock,
                     barrier: threading.Barrier = barrier) -> None:
                mine = []
                barrier.wait()
                for _ in range(calls):
                    begin = time.perf_counter()
                    call()
                    mine.append(time.perf_counter() - begin)
                with lock:
                    latencies.extend(mine)

            workers = [threading.Thread(target=work, args=(c[rpc],)) for _, c in clients]
            for w in workers:
                w.start()
            start.wait()
            cpu = process_cpu_s(info["pid"]) if measure_cpu else 0.0
            switches = process_switches(info["pid"]) if measure_cpu else 0
            barrier.wait()
            begin = time.perf_counter()
            for w in workers:
                w.join()
            wall = time.perf_counter() - begin
            start.wait()  # every process's calls of this phase are done
            cpu = process_cpu_s(info["pid"]) - cpu if measure_cpu else 0.0
            switches = process_switches(info["pid"]) - switches if measure_cpu else 0
            result[rpc].append((latencies, wall, cpu, switches))
    for channels, _ in clients:
        for channel in channels:
            channel.close()
    out.put(result)


def watch_child(address: str, token: str, job_id: str, threads: int, rounds: int,
                after_seq: int, ready: Any, out: Any) -> None:
    """`threads` watchers of one job; report when all are connected, then the arrival time of
    each ``bench K`` log line."""
    from dptrain.coordinator.api.records import Event
    from dptrain.coordinator.client.client import Client

    connected = threading.Barrier(threads + 1)

    def watch() -> None:
        with Client(address, token=token) as client:
            seen = 0
            for item in client.watch_job(job_id, after_seq=after_seq):
                if not isinstance(item, Event):
                    connected.wait()
                    continue
                line = item.payload.get("line", "")
                if line.startswith("bench "):
                    out.put((int(line.split()[1]), time.time()))
                    seen += 1
                    if seen == rounds:
                        return

    watchers = [threading.Thread(target=watch, daemon=True) for _ in range(threads)]
    for w in watchers:
        w.start()
    connected.wait()
    ready.put(threads)
    for w in watchers:
        w.join()


# ---------------------------------------------------------------- the measurements

def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def bench_latency(ctx: Any, info: dict, clients: int, procs: int, calls: int,
                  rounds: int) -> list[str]:
    out, start = ctx.Queue(), ctx.Barrier(procs)
    # The first process measures the server's CPU across each phase, for all of them.
    children = [ctx.Process(target=load_child, args=(info, clients // procs, calls, rounds,
                                                     start, out, k == 0))
                for k in range(procs)]
    for child in children:
        child.start()
    results = [out.get() for _ in children]
    for child in children:
        child.join()
    per_round: dict[str, list[float]] = {}
    cpu_per_call: dict[str, list[float]] = {}
    switches_per_call: dict[str, list[float]] = {}
    latencies: dict[str, list[float]] = {}
    for rpc in RPCS:
        made = [sum(len(r[rpc][k][0]) for r in results) for k in range(rounds)]
        per_round[rpc] = [made[k] / max(r[rpc][k][1] for r in results) for k in range(rounds)]
        cpu_per_call[rpc] = [sum(r[rpc][k][2] for r in results) / made[k]
                             for k in range(rounds)]
        switches_per_call[rpc] = [sum(r[rpc][k][3] for r in results) / made[k]
                                  for k in range(rounds)]
        latencies[rpc] = [t for r in results for lat, *_ in r[rpc] for t in lat]
    goals = {"GetJob": 0.7, "ListJobs": 0.5, "SubmitJob": 0.4}
    rows, cpu_rows = [], []
    for rpc in ("Echo", "Check", "GetJob", "ListJobs", "SubmitJob"):
        # Each round's ratio against that round's Check, then the median: the load of a
        # shared machine drifts between rounds more than within one.
        ratio = statistics.median(a / b for a, b in zip(per_round[rpc], per_round["Check"]))
        goal = (f">= {goals[rpc]} {'✔' if ratio >= goals[rpc] else '✘'}" if rpc in goals
                else "")
        name = {"Echo": "bare grpcio echo (peer)", "Check": "health Check (peer)",
                "ListJobs": "ListJobs (10 jobs)"}.get(rpc, rpc)
        rows.append(f"| {name} | {clients} | {len(latencies[rpc])} | "
                    f"{percentile(latencies[rpc], 0.5) * 1e3:.1f} ms | "
                    f"{percentile(latencies[rpc], 0.99) * 1e3:.1f} ms | "
                    f"{statistics.median(per_round[rpc]):.0f} calls/s | {ratio:.2f} | {goal} |")
        # CPU per call over the Check's, per round then the median: the inverse reads like
        # the throughput ratio would on a machine whose cores the server had to itself.
        cpu_ratio = statistics.median(
            a / b for a, b in zip(cpu_per_call[rpc], cpu_per_call["Check"]) if b > 0)
        cpu_rows.append(f"| {name} | {statistics.median(cpu_per_call[rpc]) * 1e6:.0f} µs | "
                        f"{cpu_ratio:.2f} | {1 / cpu_ratio:.2f} | "
                        f"{statistics.median(switches_per_call[rpc]):.1f} |")
    return rows, cpu_rows


def bench_fanout(ctx: Any, info: dict, worker_token: str, watchers: int, procs: int,
                 rounds: int) -> list[str]:
    from dptrain.coordinator.client.worker_client import WorkerClient

    after_seq = 0  # watchers first get the job's two state events, then wait for ours
    ready, out = ctx.Queue(), ctx.Queue()
    children = [ctx.Process(target=watch_child, args=(
        info["address"], info["token"], info["job_id"], watchers // procs, rounds, after_seq,
        ready, out)) for _ in range(procs)]
    for child in children:
        child.start()
    for _ in children:
        ready.get()
    worker = WorkerClient(info["address"], info["job_id"], worker_token)
    all_in, half_in = [], []
    for k in range(rounds):
        time.sleep(0.2)
        sent = time.time()
        worker.report_progress([("log", {"line": f"bench {k}"})])
        arrivals = sorted(out.get()[1] - sent for _ in range(watchers))
        all_in.append(arrivals[-1])
        half_in.append(arrivals[len(arrivals) // 2])
    worker.close()
    for child in children:
        child.join()
    return [f"| {watchers} | {rounds} | {statistics.median(half_in) * 1e3:.1f} ms | "
            f"{statistics.median(all_in) * 1e3:.1f} ms | {max(all_in) * 1e3:.1f} ms |"]


def _durable_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _bare_transfers(info: dict, data: bytes, work: Path) -> dict[str, Any]:
    """``{row: () -> None}`` for the bare grpcio stream peers (`bare_transfer_handlers`)."""
    import grpc

    from dptrain.coordinator.api.limits import CHUNK_BYTES, channel_options

    channel = grpc.insecure_channel(info["echo"], options=channel_options())
    chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
    sink = channel.stream_unary("/bench.Transfer/Sink")
    sink_to_disk = channel.stream_unary("/bench.Transfer/SinkToDisk")
    source = channel.unary_stream("/bench.Transfer/Source")
    size = len(data).to_bytes(8, "little")

    def receive(write: bool) -> None:
        if not write:
            for _ in source(size, timeout=600):
                pass
            return
        with open(work / "bare-download", "wb") as f:
            for chunk in source(size, timeout=600):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())

    return {"bare_up": lambda: sink(iter(chunks), timeout=600),
            "bare_up_disk": lambda: sink_to_disk(iter(chunks), timeout=600),
            "bare_down": lambda: receive(False),
            "bare_down_disk": lambda: receive(True),
            "_channel": channel}


GOAL_ROWS = ("upload", "download", "download_2")
"""The transfers the goal (>= 0.8x a copy + fsync) is for: the default path."""


def _bare_sockets(info: dict, src: Path, work: Path) -> dict[str, Any]:
    """``{row: () -> None}`` for the bare socket peers (`bare_socket_server`)."""
    import socket

    from dptrain.coordinator.api.limits import CHUNK_BYTES

    size = src.stat().st_size

    def connect(op: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", info["socket"]))
        sock.sendall(op + size.to_bytes(8, "little"))
        return sock

    def up() -> None:
        with connect(b"u") as sock, open(src, "rb") as f:
            sock.sendfile(f)
            sock.recv(8, socket.MSG_WAITALL)

    def down() -> None:
        with connect(b"d") as sock, open(work / "bare-socket-download", "wb") as f:
            while data := sock.recv(CHUNK_BYTES):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return {"sock_up_disk": up, "sock_down_disk": down}


def bench_transfer(info: dict, worker_token: str, work: Path, size_mib: int,
                   rounds: int, algorithm: str) -> list[str]:
    from dptrain.coordinator.client.client import Client
    from dptrain.coordinator.client.worker_client import WorkerClient
    from dptrain.worker.checkpoint_manifest import write_manifest

    data = os.urandom(size_mib << 20)
    bare = _bare_transfers(info, data, work)
    times: dict[str, list[float]] = {k: [] for k in (
        "upload", "download", "download_2", "upload_grpc", "download_grpc", "copy",
        "copy_nosync", "sock_up_disk", "sock_down_disk", "bare_up", "bare_up_disk",
        "bare_down", "bare_down_disk")}
    ca = info["tls_ca"]
    worker = WorkerClient(info["address"], info["job_id"], worker_token, ca, timeout=600)
    client = Client(info["address"], token=info["token"], tls_ca=ca, timeout=600)
    worker_grpc = WorkerClient(info["address"], info["job_id"], worker_token, ca, timeout=600,
                               data_port=False)
    client_grpc = Client(info["address"], token=info["token"], tls_ca=ca, timeout=600,
                         data_port=False)
    source = work / "source.bin"
    source.write_bytes(data)
    sockets = _bare_sockets(info, source, work)
    sockets["sock_down_disk"]()  # the server makes its source file at the first call: not timed

    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in times}

    def timed(row: str, call: Any, *args: Any, **kwargs: Any) -> None:
        server, client_cpu = process_cpu_s(info["pid"]), time.process_time()
        start = time.perf_counter()
        call(*args, **kwargs)
        times[row].append(time.perf_counter() - start)
        cpu[row].append((time.process_time() - client_cpu, process_cpu_s(info["pid"]) - server))

    for step in range(1, rounds + 1):
        ckpt = work / f"step-{step:08d}"
        ckpt.mkdir()
        model = ckpt / "model.safetensors"
        # Each round's checkpoint differs, as a training job's do: the server stores a new
        # blob (the same bytes again would replace the stored copy instead).
        model.write_bytes(step.to_bytes(8, "little") + data[8:])
        write_manifest(ckpt, {"step": step}, ["model.safetensors"], algorithm)
        # The data port and the gRPC stream swap places every round, as do the downloads: the
        # first transfer of a kind follows the previous one's write-back.
        uploads = (("upload", worker), ("upload_grpc", worker_grpc))[::1 if step % 2 else -1]
        for row, uploader in uploads:
            if row == "upload_grpc":  # the same step again: a checkpoint replaces its step's
                write_manifest(ckpt, {"step": step, "again": 1}, ["model.safetensors"],
                               algorithm)
            timed(row, uploader.upload_checkpoint, ckpt)
        for row in ("download", "download_2", "download_grpc")[::1 if step % 2 else -1]:
            timed(row, client_grpc.download_checkpoint if row == "download_grpc"
                  else client.download_checkpoint, info["job_id"], step=step,
                  dest=work / "downloaded", **({"streams": 2} if row == "download_2" else {}))
        timed("copy", _durable_copy, model, work / "copied")
        timed("copy_nosync", shutil.copyfile, model, work / "copied-nosync")
        for row in ("sock_up_disk", "sock_down_disk"):
            timed(row, sockets[row])
        for row in ("bare_up", "bare_up_disk", "bare_down", "bare_down_disk"):
            timed(row, bare[row])
        shutil.rmtree(ckpt)
    assert worker.data_port and client.data_port, "the data port was not used"
    for c in (worker, client, worker_grpc, client_grpc):
        c.close()
    bare["_channel"].close()
    mb = len(data) / 1e6
    rate = {k: mb / statistics.median(v) for k, v in times.items()}
    goal = lambda r: f">= 0.8x {'✔' if r >= 0.8 else '✘'}"  # noqa: E731
    rows = []
    for row, name, peer in (
            ("upload", "upload over the data port (default)", "sock_up_disk"),
            ("download", "download over the data port (default)", "sock_down_disk"),
            ("download_2", "download in ranges over two data connections (`streams=2`)",
             "sock_down_disk"),
            ("upload_grpc", "upload over the gRPC stream (`data_port=False`)", "bare_up_disk"),
            ("download_grpc", "download over the gRPC stream (`data_port=False`)",
             "bare_down_disk"),
            ("sock_up_disk", "bare socket to the server, sendfile → recv + write + fsync "
             "(peer)", None),
            ("sock_down_disk", "bare socket from the server, sendfile → recv + write + fsync "
             "(peer)", None),
            ("bare_up", "bare gRPC stream to the server, dropped (peer)", None),
            ("bare_up_disk", "bare gRPC stream to the server, written + fsync (peer)", None),
            ("bare_down", "bare gRPC stream from the server, dropped (peer)", None),
            ("bare_down_disk", "bare gRPC stream from the server, written + fsync (peer)",
             None),
            ("copy", "plain copy + fsync (peer)", None),
            ("copy_nosync", "plain copy without fsync (reference)", None)):
        over_copy = rate[row] / rate["copy"]
        over_bare = f"{rate[row] / rate[peer]:.2f}x" if peer else ""
        client_ms, server_ms = (statistics.median(c[i] for c in cpu[row]) * 1e3 for i in (0, 1))
        rows.append(f"| {name} | {size_mib} MiB | {rate[row]:.0f} MB/s | {client_ms:.0f} ms, "
                    f"{server_ms:.0f} ms | {over_copy:.2f}x | {over_bare} | "
                    f"{goal(over_copy) if row in GOAL_ROWS else ''} |")
    return rows


def machine() -> str:
    """One line about this machine."""
    import grpc

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
            f", grpcio {grpc.__version__}, {platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--calls", type=int, default=20,
                        help="calls per client, RPC and round")
    parser.add_argument("--rpc-rounds", type=int, default=5,
                        help="rounds of the RPC phases (interleaved)")
    parser.add_argument("--only", choices=("rpc", "fanout", "transfer"), action="append",
                        help="run only these parts (repeatable; default all)")
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15, help="fan-out events")
    parser.add_argument("--size-mib", type=int, default=64, help="checkpoint file size")
    parser.add_argument("--transfers", type=int, default=5, help="upload/download rounds")
    parser.add_argument("--hash", default="blake3", choices=("blake3", "sha256"),
                        help="the checkpoint manifest's hash (sha256: as written before)")
    parser.add_argument("--tls", action="store_true",
                        help="the coordinator serves TLS (gRPC and its data port; transfers "
                             "only): the transfer rows go over TLS, the bare peers do not")
    parser.add_argument("--serve-child", metavar="STATE_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--worker-token", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args.serve_child, args.worker_token, args.tls)
        return
    if args.tls and set(args.only or ()) != {"transfer"}:
        parser.error("--tls: with --only transfer (the RPC and fan-out clients speak plaintext)")
    from dptrain.coordinator.api.records import new_token

    ctx = mp.get_context("spawn")  # gRPC does not survive fork
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    worker_token = new_token()
    with tempfile.TemporaryDirectory(prefix="dptrain-bench-") as tmp:
        work = Path(tmp)
        server = subprocess.Popen(
            # --worker-token=...: a token may start with "-", which argparse would take for
            # an option if it came as a separate argument.
            [sys.executable, __file__, "--serve-child", str(work / "state"),
             f"--worker-token={worker_token}", *(["--tls"] if args.tls else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            info = json.loads(server.stdout.readline())
            parts = set(args.only or ("rpc", "fanout", "transfer"))
            latency, cpu = (bench_latency(ctx, info, args.clients, 2, args.calls,
                                          args.rpc_rounds) if "rpc" in parts else ([], []))
            fanout = (bench_fanout(ctx, info, worker_token, args.watchers, 4, args.rounds)
                      if "fanout" in parts else [])
            transfer = (bench_transfer(info, worker_token, work, args.size_mib, args.transfers,
                                       args.hash) if "transfer" in parts else [])
        finally:
            server.stdin.close()
            server.wait(60)
    print(f"Machine: {machine()}; load average before: {load}\n")
    if latency:
        print(f"RPC throughput, median of {args.rpc_rounds} interleaved rounds; ratio: over "
              f"the health Check of the same round, median over the rounds\n")
        print("| RPC | concurrent clients | calls | p50 | p99 | throughput | ratio | goal |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        print("\n".join(latency) + "\n")
        print("Server CPU per call (the server process's user + system time over each phase, "
              "per call; ratio: over the health Check's of the same round, median over the "
              "rounds)\n")
        print("| RPC | server CPU per call | ÷ Check's | Check's ÷ this "
              "| server context switches per call |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(cpu) + "\n")
    if fanout:
        print("| watchers | events | half have it | all have it (median) "
              "| all have it (worst) |")
        print("|---:|---:|---:|---:|---:|")
        print("\n".join(fanout) + "\n")
    if transfer:
        print(f"Checkpoint transfer ({args.hash} manifest{', TLS' if args.tls else ''}), "
              f"median of {args.transfers} rounds; "
              f"(interleaved); peers: `shutil.copyfile` + `fsync` of the same file, the same "
              f"bytes over a bare TCP socket, and over a bare grpcio stream in the same "
              f"chunks\n")
        print("CPU: of this process (the client: uploads, downloads, copies) and of the server's"
              " (coordinator and bare echo server), median per transfer, in clock ticks\n")
        print("| transfer | file | rate | CPU: client, server | over copy + fsync "
              "| over its bare peer (socket or gRPC) + write + fsync | goal |")
        print("|---|---:|---:|---:|---:|---:|---|")
        print("\n".join(transfer))


if __name__ == "__main__":
    main()

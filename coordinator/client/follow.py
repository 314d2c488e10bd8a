"""What the CLI shows of a job: the live progress bar, event lines, tables, and loss curves;
and the progress bar of a download.

Everything here reads a `client.client.Client`'s domain objects (`Job`, `Event`) and
writes text (or a PNG); nothing talks grpc directly.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dptrain.coordinator.api.records import Event, EventKind, Job, JobState

if TYPE_CHECKING:
    from dptrain.coordinator.client.client import DownloadProgress

__all__ = [
    "follow_job", "events_now", "format_event", "format_metrics", "format_job", "format_table",
    "final_summary", "curves_figure", "plot_curves", "download_bar", "METRIC_NAMES",
]

#: Metrics shown, in this order, with their short names.
METRIC_NAMES = (("loss", "loss"), ("accuracy", "acc"), ("val_loss", "val_loss"),
                ("val_accuracy", "val_acc"), ("samples_per_s", "samples/s"))


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def format_metrics(metrics: dict[str, Any], names: Sequence[tuple[str, str]] = METRIC_NAMES
                   ) -> str:
    """``loss 0.31  acc 0.9  samples/s 4210`` for the metrics present.

    Args:
        metrics: metric name -> value.
        names: which to show, as (key, label), in order.
    """
    return "  ".join(f"{label} {_number(metrics[key])}" for key, label in names
                     if metrics.get(key) is not None)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def format_event(event: Event) -> str:
    """One line for an event, as ``dptrain watch`` prints it.

    Args:
        event: the event.

    Returns:
        ``HH:MM:SS kind details``.
    """
    p = event.payload
    if event.kind is EventKind.STATE:
        text = f"state {p['state']}"
        if p.get("exit_code") is not None and p["state"] != "RUNNING":
            text += f" (exit code {p['exit_code']})"
        if p.get("error"):
            text += f": {str(p['error']).splitlines()[0]}"
    elif event.kind is EventKind.METRICS:
        shown = format_metrics(p) or "  ".join(f"{k} {_number(v)}" for k, v in p.items()
                                               if k != "step")
        text = f"step {p.get('step')}  {shown}"
    elif event.kind is EventKind.CHECKPOINT:
        text = (f"checkpoint step {p['step']} ({p['size'] / 1e3:.1f} kB, sha256 "
                f"{p['sha256'][:12]}…)")
    else:
        text = f"log {p.get('line', '')}"
    return f"{_clock(event.time)} {text}"


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def format_job(job: Job) -> str:
    """The job's fields, one per line, as ``dptrain status`` prints them."""
    hosts = ",".join(f"{h}:{n}" for h, n in job.placement)
    rows = [
        ("id", job.id), ("name", job.name), ("owner", job.owner), ("state", job.state.value),
        ("workers", f"{job.workers}" + (f" on {hosts}" if hosts else "")),
        ("priority", job.priority), ("restarts", f"{job.restarts} of {job.max_restarts}"),
        ("time limit", "-" if job.time_limit is None else f"{job.time_limit:g} s per run" + (
            f" (this run stops at {_when(job.started_at + job.time_limit)})"
            if job.state is JobState.RUNNING and job.started_at is not None else "")),
        ("submitted", _when(job.submitted_at)), ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("step", "-" if job.last_step is None else job.last_step),
        ("metrics", format_metrics(job.metrics) or "-"),
        ("exit code", "-" if job.exit_code is None else job.exit_code),
    ]
    lines = [f"{name + ':':<12}{value}" for name, value in rows]
    if job.error:
        first, *rest = job.error.splitlines()
        lines.append(f"{'error:':<12}{first}")
        lines += [f"{'':<12}{line}" for line in rest]
    return "\n".join(lines)


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain text table with columns padded to their widest cell."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)


def final_summary(job: Job) -> str:
    """The last line of ``submit --follow``: the outcome and the final metrics."""
    text = f"job {job.id} ({job.name}) {job.state.value}"
    if job.last_step is not None:
        text += f" at step {job.last_step}"
    shown = format_metrics(job.metrics)
    if shown:
        text += f": {shown}"
    if job.error and job.state is not JobState.SUCCEEDED:
        text += f"\n  error: {job.error.splitlines()[0]}"
    return text


def _spec_total(job: Job) -> int | None:
    spec = job.spec or {}
    if spec.get("max_steps") and not spec.get("epochs"):
        return int(spec["max_steps"])
    total = job.metrics.get("total_steps")
    return int(total) if total else None


def follow_job(items: Iterator[Job | Event], stream: TextIO | None = None) -> Job | None:
    """Show a job's progress as a tqdm bar until it reaches a final state.

    The bar's total comes from the job (``max_steps``, or the ``total_steps`` its workers
    report); its postfix shows loss, accuracy and samples/s; ETA is tqdm's. State changes
    (a restart and its reason, the end) and the coordinator's own notices are printed above it.

    Args:
        items: ``client.watch_job(job_id)``: the `Job`, then its events.
        stream: where the bar goes (default: stderr).

    Returns:
        The job as first received (the caller fetches its final form), or None if the
        stream was empty.
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    first: Job | None = None
    bar = None

    def new_bar(start: int, total: int | None) -> Any:
        # A bar per run of the workers, so the rate and ETA measure training, not start-up.
        if bar is not None:
            bar.close()
        return tqdm(total=total, initial=start, unit="step", desc=f"{first.name} {first.id}",
                    file=stream, dynamic_ncols=True, mininterval=0.2, leave=True)

    def say(line: str) -> None:
        if bar is not None:
            bar.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)

    try:
        for item in items:
            if isinstance(item, Job):
                first = item
                continue
            if first is None:
                continue
            p = item.payload
            if item.kind is EventKind.METRICS:
                step = int(p.get("step") or 0)
                if bar is None or "start_step" in p:
                    total = p.get("total_steps") or _spec_total(first)
                    bar = new_bar(int(p.get("start_step", step)), int(total) if total else None)
                if "loss" in p:
                    bar.set_postfix_str(format_metrics(p, METRIC_NAMES[:2] + METRIC_NAMES[4:]),
                                        refresh=False)
                if step != bar.n:
                    bar.update(step - bar.n)
            elif item.kind is EventKind.STATE:
                state = p["state"]
                if state == "RESTARTING":
                    reason = str(p.get("error", "")).splitlines()[:1]
                    say(f"restarting from the latest checkpoint"
                        f"{': ' + reason[0] if reason else ''}")
                elif state == "RUNNING" and p.get("previous") == "RESTARTING":
                    say("running again")
            elif item.kind is EventKind.LOG and str(p.get("line", "")).startswith("[dptrain]"):
                say(p["line"])
    finally:
        if bar is not None:
            bar.close()
    return first


def events_now(client: Any, job_id: str, *, follow: bool = False, idle: float = 1.0
               ) -> Iterator[Event]:
    """A job's events: all of them until its end (`follow`), or those stored so far.

    Without `follow`, the listing ends at the first event stamped after it began (by this
    machine's clock, so clocks out of step by a few seconds move the cut as much), or when no
    event arrived for `idle` seconds (the server sends what it has at once).

    Args:
        client: a `client.client.Client`.
        job_id: the job.
        follow: keep going until the job reaches a final state.
        idle: seconds of silence that end the listing (without `follow`).

    Yields:
        The events, oldest first.

    Raises:
        ClientError: from the watch (e.g. NOT_FOUND).
    """
    stream = client.watch_job(job_id)
    if follow:
        for item in stream:
            if isinstance(item, Event):
                yield item
        return
    cutoff = time.time()
    inbox: queue.Queue = queue.Queue()
    done = object()

    def pump() -> None:
        try:
            for item in stream:
                inbox.put(item)
        except BaseException as e:  # handed to the reader, raised there
            inbox.put(e)
        inbox.put(done)

    threading.Thread(target=pump, daemon=True, name="dptrain-events").start()
    try:
        while True:
            try:
                item = inbox.get(timeout=idle)
            except queue.Empty:
                return
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Event):
                if item.time > cutoff:
                    return
                yield item
    finally:
        client.close()  # ends the stream the pump is reading


def curves_figure(events: Iterable[Event], title: str = "") -> tuple[Any, int]:
    """Draw loss and accuracy against the step (training and validation) on a matplotlib
    figure: what `plot_curves` saves, open to inspection.

    A step reported twice (a restart resumed before it) keeps its last values.

    Args:
        events: the job's events (only ``metrics`` ones are used).
        title: the figure's title.

    Returns:
        ``(figure, number of steps with training metrics)``; close the figure with
        ``matplotlib.pyplot.close`` when done. It is 1100 x 400 pixels at 100 dpi with an
        accuracy panel, 600 x 400 without.

    Raises:
        ValueError: there are no metrics to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, float]] = {k: {} for k in ("loss", "val_loss", "accuracy",
                                                          "val_accuracy")}
    for event in events:
        if event.kind is not EventKind.METRICS or "step" not in event.payload:
            continue
        step = int(event.payload["step"])
        for key, points in series.items():
            value = event.payload.get(key)
            if isinstance(value, (int, float)):
                points[step] = float(value)
    if not series["loss"] and not series["val_loss"]:
        raise ValueError("the job has reported no loss yet: nothing to plot")
    has_accuracy = bool(series["accuracy"] or series["val_accuracy"])
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(11 if has_accuracy else 6,
                                                                    4), squeeze=False)
    for ax, (train, val, label) in zip(axes[0], [("loss", "val_loss", "loss"),
                                                 ("accuracy", "val_accuracy", "accuracy")]):
        for key, style, name in ((train, "-", "training"), (val, "o-", "validation")):
            points = sorted(series[key].items())
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], style, label=name,
                        markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig, len(series["loss"])


def plot_curves(events: Iterable[Event], path: str | Path, title: str = "") -> int:
    """Draw loss and accuracy against the step (training and validation) into a PNG
    (`curves_figure`, saved at 100 dpi).

    Args:
        events: the job's events (only ``metrics`` ones are used).
        path: the image file to write.
        title: the figure's title.

    Returns:
        The number of steps with training metrics.

    Raises:
        ValueError: there are no metrics to plot.
    """
    fig, steps = curves_figure(events, title)
    import matplotlib.pyplot as plt  # (curves_figure has chosen the Agg backend)

    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return steps


class download_bar:  # noqa: N801 - used as a function: ``with download_bar() as progress``
    """A tqdm bar of a download (bytes), for ``Client.download_checkpoint(on_progress=...)``.

    A resumed stream shows where it resumed in the bar's description and starts its rate
    afresh, the bytes kept counted as done.

    Args:
        stream: where the bar goes (default: stderr).

    Example::

        with download_bar() as progress:
            client.download_checkpoint(job_id, on_progress=progress)
    """

    def __init__(self, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.bar: Any = None
        self._resumed_at: int | None = None

    def __call__(self, p: DownloadProgress) -> None:
        from tqdm import tqdm

        if self.bar is None or p.resumed_at != self._resumed_at:
            desc = f"{p.name} of step {p.step}"
            if p.resumed_at is not None:
                desc += f" (resumed at {p.resumed_at / 2**20:.1f} MiB)"
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=p.size, initial=p.done, unit="B", unit_scale=True,
                            unit_divisor=1024, desc=desc, file=self.stream, dynamic_ncols=True,
                            mininterval=0.2, leave=True)
            self._resumed_at = p.resumed_at
        self.bar.update(p.done - self.bar.n)

    def __enter__(self) -> download_bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

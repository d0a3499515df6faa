"""``runledger bench --out DIR``: the report as a PNG chart (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from runledger.schemas.errors import PermanentError

__all__ = ["draw"]


class ChartUnavailable(PermanentError):
    code = "chart_unavailable"


def draw(report: dict[str, Any], path: Path) -> None:
    """Throughput per path with its spread, the worker paths' lock waits, latency per rate, and RSS over a long
    run, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ChartUnavailable("drawing the chart needs matplotlib: pip install 'runledger[bench]'") from None
    data = {"throughput": report.get("throughput"), "locks": (report.get("throughput") or {}).get("lock_wait"),
            "latency": report.get("latency"), "memory": report.get("memory")}
    panels = [p for p in ("throughput", "locks", "latency", "memory") if data[p]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    drawers: dict[str, Callable[[Any, Any], None]] = {"throughput": _throughput, "locks": _locks,
                                                      "latency": _latency, "memory": _memory}
    for ax, panel in zip(axes[0], panels, strict=True):
        drawers[panel](ax, data[panel])
    machine = report.get("machine", {})
    fig.suptitle(f"runledger bench · {machine.get('cpus')} CPUs, {machine.get('memory_gib')} GiB · "
                 f"{report.get('command', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(ax: Any, data: dict[str, Any]) -> None:
    names = list(data["events_per_s"])
    medians = [data["events_per_s"][n]["median"] for n in names]
    low = [m - data["events_per_s"][n]["min"] for n, m in zip(names, medians, strict=True)]
    high = [data["events_per_s"][n]["max"] - m for n, m in zip(names, medians, strict=True)]
    ax.bar(names, medians, yerr=[low, high], capsize=4, color=["#888888"] + ["#3b75af"] * (len(names) - 1))
    for i, n in enumerate(names):
        share = data.get("share_of_floor", {}).get(n)
        if share:
            ax.annotate(f"{share['median']:.0%}", (i, medians[i]), ha="center", va="bottom", fontsize=8)
    ax.set_title(f"events/s, median of {data['rounds']} rounds (min-max)", fontsize=9)


def _locks(ax: Any, paths: dict[str, Any]) -> None:
    names = list(paths)
    medians = [100 * (paths[n]["median"] or 0) for n in names]
    low = [m - 100 * (paths[n]["min"] or 0) for n, m in zip(names, medians, strict=True)]
    high = [100 * (paths[n]["max"] or 0) - m for n, m in zip(names, medians, strict=True)]
    ax.bar(names, medians, yerr=[low, high], capsize=4, color="#c0504d")
    for i, n in enumerate(names):
        if paths[n]["median"] is None:
            ax.annotate("no sample", (i, 0), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("% of in-transaction time")
    ax.set_title("waiting for locks, median of rounds (min-max)", fontsize=9)


def _latency(ax: Any, rows: list[dict[str, Any]]) -> None:
    rates = [str(int(r["rate"])) for r in rows]
    ax.plot(rates, [r["p50_ms"] for r in rows], marker="o", label="p50")
    ax.plot(rates, [r["p99_ms"] for r in rows], marker="o", label="p99")
    ax.set_xlabel("events/s sent")
    ax.set_ylabel("ms, event time to commit")
    ax.legend(fontsize=8)
    ax.set_title("latency at fixed rates, one worker", fontsize=9)


def _memory(ax: Any, data: dict[str, Any]) -> None:
    done, mib = zip(*data["samples"], strict=True) if data["samples"] else ((), ())
    ax.plot(done, mib)
    ax.set_xlabel("events committed")
    ax.set_ylabel("worker RSS, MiB")
    ax.set_title(f"memory over {data['events']:,} events (growth {data['growth_mib']} MiB)", fontsize=9)

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
    """Throughput per path with its spread, latency per rate, and RSS over a long run, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ChartUnavailable("drawing the chart needs matplotlib: pip install 'runledger[bench]'") from None
    panels = [p for p in ("throughput", "latency", "memory") if report.get(p)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    drawers: dict[str, Callable[[Any, Any], None]] = {"throughput": _throughput, "latency": _latency,
                                                      "memory": _memory}
    for ax, panel in zip(axes[0], panels, strict=True):
        drawers[panel](ax, report[panel])
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

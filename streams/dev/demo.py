"""The main job, end to end: the embedded stack, a projection worker, a simulated fleet, a summary.

The worker runs as ``runledger worker`` in a process of its own, exactly as in
production; its log goes to ``<state dir>/worker.log``. Part of the fleet (a quarter by default) is
appended over HTTP through ``runledger serve`` (a subprocess, its log in ``<state dir>/serve.log``) with
signed requests, as a producer in another language would; the rest through ``EventProducer``. Every event of the run
is also delivered as a signed webhook to a receiver the demo starts (``demohooks``), by a ``runledger webhooks
worker`` (its log in ``<state dir>/webhooks.log``). The demo waits, with a
progress bar, until every event of its run is projected and delivered, then reads the
summary back from PostgreSQL and re-checks every chain from the audit log. Last it
signs a checkpoint of the transparency log, verifies the whole record, and writes the
dashboards' panels as an HTML page.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import asyncpg
from tqdm import tqdm

from runledger.projections.postgres.db import connect_one, migrate
from runledger.projections.postgres.queries import query
from runledger.projections.postgres.report import RunSummary, summarize
from runledger.projections.postgres.verify import ChainReport, record_verification, verify_chains
from runledger.schemas.errors import PermanentError, TransientError
from runledger.streams.dev import WORKER_COMMAND, devstack
from runledger.streams.dev.demohooks import WEBHOOKS_COMMAND, demo_webhooks, wait_delivered
from runledger.streams.dev.demohttp import http_fleet
from runledger.streams.dev.fleet import Execution, simulate_fleet
from runledger.streams.producer.client import append_many
from runledger.streams.settings import Settings
from runledger.streams.tools.checkpoints import checkpoint_signer, create_signer_key, sign_round
from runledger.streams.tools.htmlreport import write_report

__all__ = ["DemoFailed", "print_summary", "run_demo"]


class DemoFailed(TransientError):
    """The worker died, or did not project the run in time; its log says why."""

    code = "demo_failed"


class _Worker:
    """A worker of runledger's as a child process (``runledger worker`` by default), its log in
    ``<state dir>/<name>.log``, stopped on exit."""

    def __init__(self, settings: Settings, command: tuple[str, ...] = WORKER_COMMAND, name: str = "worker",
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = settings.state_dir / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                         stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self._process.pid

    def check_alive(self) -> None:
        if self._process.poll() is not None:
            raise DemoFailed(f"the {self.name} exited with status {self._process.returncode}; the end of "
                             f"{self.log_path}:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        self._log.close()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def _wait_projected(conn: asyncpg.Connection, settings: Settings, run_tag: str, total: int,
                          worker: _Worker, *, timeout: float, progress: bool) -> None:
    bar = tqdm(total=total, unit="ev", desc="projecting", disable=None if progress else True, file=sys.stderr)
    deadline = time.monotonic() + timeout
    try:
        while True:
            projected, rejected = await conn.fetchrow(query("run_progress"), run_tag)
            bar.update(projected - bar.n)
            if rejected:
                raise PermanentError(f"the worker dead-lettered {rejected} events of run {run_tag}: see "
                                     "`runledger dlq list`")
            if projected >= total:
                return
            worker.check_alive()
            problems = await conn.fetch(query("problems"), settings.consumer_group, settings.events_topic)
            if problems:
                raise DemoFailed(f"the worker does not project {len(problems)} partitions of "
                                 f"{settings.events_topic}: {problems[0]['problem']}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"{projected} of {total} events projected after {timeout:.0f} s; the end of "
                                 f"{worker.log_path}:\n{_tail(worker.log_path)}")
            await asyncio.sleep(0.2)
    finally:
        bar.close()


async def _run(settings: Settings, fleet: list[Execution], run_tag: str, worker: _Worker, *, timeout: float,
               progress: bool, out: IO[str], http_share: float = 0.0) -> tuple[RunSummary, bool]:
    """Append the fleet, wait until it is projected and delivered to the demo's webhook receiver; the summary,
    and whether every event reached the receiver, signed and in order."""
    total = sum(len(run.events) for run in fleet)
    every = round(1 / http_share) if http_share > 0 else 0  # every Nth execution goes over HTTP
    over_http = [run for i, run in enumerate(fleet) if every and i % every == 0]
    direct = [run for i, run in enumerate(fleet) if not (every and i % every == 0)]
    async with demo_webhooks(settings, run_tag) as hooks:
        started = time.monotonic()
        sent = None
        if over_http:
            async with http_fleet(settings, run_tag) as post:
                sent, _ = await asyncio.gather(post(over_http), append_many(
                    settings, [(run.stream_id, e) for run in direct for e in run.events], progress=progress))
        else:
            await append_many(settings, [(run.stream_id, e) for run in direct for e in run.events],
                              progress=progress)
        appended = time.monotonic() - started
        conn = await connect_one(settings.database_dsn(), settings.db_schema)
        try:
            await _wait_projected(conn, settings, run_tag, total, worker, timeout=timeout, progress=progress)
            projected = time.monotonic() - started
            print(f"\nrun {run_tag}: {len(fleet)} executions, {total:,} events appended to {settings.events_topic} "
                  f"in {appended:.1f} s, all projected into schema {settings.db_schema} {projected:.1f} s after the "
                  f"first append", file=out)
            if sent is not None:
                print(f"over HTTP: {sent.executions} of {len(fleet)} executions ({sent.events:,} events) in "
                      f"{sent.requests} signed requests to runledger serve at {sent.url} as source {sent.source_id} "
                      "(Standard Webhooks v1); the rest through EventProducer", file=out)
            await wait_delivered(hooks, total, timeout)
            delivered = len(hooks.messages) == total and not hooks.refused and not hooks.out_of_order
            print(f"webhooks: {len(hooks.messages):,} of {total:,} events delivered to the demo's receiver at "
                  f"{hooks.url} (endpoint {hooks.endpoint_id}) {time.monotonic() - started:.1f} s after the first "
                  f"append, in {hooks.deliveries:,} signed deliveries, signatures verified ({hooks.refused} "
                  f"refused), {len(hooks.out_of_order)} streams out of seq order"
                  + ("" if delivered else f"; see {settings.state_dir / 'webhooks.log'} and `runledger webhooks "
                     f"deliveries --endpoint {hooks.endpoint_id}`"), file=out)
            return await summarize(conn, run_tag), delivered
        finally:
            await conn.close()


async def _attest(settings: Settings, out: IO[str]) -> ChainReport:
    """Sign checkpoints of the transparency logs and verify every chain of the record, kept: what the integrity
    panels show. The embedded stack's signer key is created on first use."""
    signer = checkpoint_signer(settings)
    if signer is None:
        signer = create_signer_key(settings)
        print(f"\ncreated the checkpoint signer key {settings.checkpoint_key_path} (`runledger keys init`; its "
              f"verifier key, for auditors, is {settings.checkpoint_key_path}.pub)", file=out)
    done = await sign_round(settings, signer)
    size = sum(s.checkpoint.size for s in done.signed)
    print(f"\n{len(done.signed)} checkpoints signed, one per log partition that grew: the transparency logs of "
          f"{size:,} records, derived from Kafka" + (f"; {len(done.refused) + len(done.findings)} partitions "
                                                     "refused or disagreeing (`runledger checkpoint`)"
                                                     if done.refused or done.findings else ""), file=out)
    report = await verify_chains(settings.database_dsn(), settings.db_schema)
    await record_verification(settings.database_dsn(), settings.db_schema, "chains", report)
    print(f"verify chains: {report.events:,} events of {report.streams:,} streams, "
          + ("intact" if report.intact else f"{len(report.findings)} findings (`runledger verify chains`)"), file=out)
    return report


def run_demo(settings: Settings, executions: int, *, seed: int = 7, timeout: float = 300.0, progress: bool = True,
             out: IO[str] = sys.stdout, log: Callable[[str], None] = print, http_share: float = 0.25) -> bool:
    """Start the stack, a worker and a webhook delivery worker with a receiver, append a simulated fleet, wait until
    projected and delivered, summarise, sign a checkpoint and verify the whole record; True if every chain is intact
    and every event reached the receiver, signed, in order."""
    for service in devstack.up(settings):
        log(f"{service.name:<9} {service.state:<8} {service.url}")
    asyncio.run(migrate(settings.database_dsn(), settings.db_schema))
    run_tag = f"demo-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{seed}"
    fleet = simulate_fleet(executions, seed=seed, run_tag=run_tag)
    # Killed (SIGTERM), the demo still stops its worker: the default handler would end it without ``finally``.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    workers: list[_Worker] = []
    try:  # the workers started are stopped wherever the signal comes, even before their start is announced
        workers.append(_Worker(settings))
        log(f"worker    started  pid {workers[0].pid}, log in {workers[0].log_path}")
        workers.append(_Worker(settings, WEBHOOKS_COMMAND, "webhooks",
                               {"RUNLEDGER_WEBHOOK_ALLOW_PRIVATE": "true", "RUNLEDGER_METRICS_PORT": "0"}))
        log(f"webhooks  started  pid {workers[1].pid}, log in {workers[1].log_path}")
        summary, delivered = asyncio.run(_run(settings, fleet, run_tag, workers[0], timeout=timeout,
                                              progress=progress, out=out, http_share=http_share))
    finally:
        for worker in workers:
            worker.stop()
    print_summary(summary, out)
    record = asyncio.run(_attest(settings, out))
    began = min(e.time for run in fleet for e in run.events if e.time is not None)
    page = asyncio.run(write_report(settings, settings.state_dir / "report.html",  # over this run's time
                                    began.replace(second=0, microsecond=0)))
    print(f"\nthe dashboards' panels as a page for people without Grafana: {page.resolve()}", file=out)
    return record.intact and not summary.broken_chains and delivered


def _money(value: object) -> str:
    return "unpriced" if value is None else f"${value:,.6f}"


def print_summary(summary: RunSummary, out: IO[str] = sys.stdout) -> None:
    """The demo's report: executions by status, spend by model and workflow, the most expensive runs, chains."""
    def line(text: str = "") -> None:
        print(text, file=out)

    line("\nexecutions by status")
    for r in summary.by_status:
        line(f"  {r['status']:<12}{r['executions']:>6}")
    line("\nspend by model")
    line(f"  {'provider/model':<44}{'calls':>7}{'tokens in':>12}{'tokens out':>12}{'spend':>16}  priced by")
    for r in summary.by_model:
        how = (f"{r['unpriced']} unpriced (model not in the catalog)" if r["unpriced"] else
               f"catalog {r['from_catalog']}, event {r['calls'] - r['from_catalog']}")
        spend = _money(None if r["unpriced"] == r["calls"] else r["cost_usd"])
        line(f"  {r['provider'] + '/' + r['model']:<44}{r['calls']:>7}{r['input_tokens']:>12,}"
             f"{r['output_tokens']:>12,}{spend:>16}  {how}")
    line("\nspend by workflow")
    line(f"  {'workflow':<24}{'executions':>11}{'completed':>11}{'spend':>16}{'unpriced calls':>16}")
    for r in summary.by_workflow:
        line(f"  {r['workflow']:<24}{r['executions']:>11}{r['completed']:>11}{_money(r['cost_usd']):>16}"
             f"{r['unpriced']:>16}")
    line("\nmost expensive executions")
    for r in summary.top_executions:
        over = "  OVER BUDGET" if r["budget_usd"] is not None and r["cost_usd"] > r["budget_usd"] else ""
        line(f"  {r['stream_id']:<48}{r['status']:<11}{_money(r['cost_usd']):>14}  budget "
             f"{_money(r['budget_usd'])}{over}")
    line(f"\nchains checked intact: {summary.chains_intact} of {summary.chains_checked} (every hash recomputed "
         "from the audit log's raw bytes, every link followed)")
    line(f"the record holds {summary.all_runs['executions']:,} executions ({summary.all_runs['events']:,} events) "
         "of every run so far")
    for b in summary.broken_chains:
        line(f"  BROKEN {b.subject} at seq {b.seq}: {b.code}: {b.reason}")

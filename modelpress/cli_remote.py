"""The ``modelpress`` commands that talk to a running service (through :mod:`modelpress.client`):

    modelpress models upload|list|show|delete
    modelpress jobs submit MODEL (--method M [--set K=V]... | --recipe FILE) [--wait] [-o FILE]
    modelpress jobs list|show|events|cancel|download
    modelpress compare MODEL
    modelpress methods

The service: ``--url``/``--api-key`` or MODELPRESS_URL/MODELPRESS_API_KEY. Long work shows live
progress bars (upload bytes, the job's stage and percent, download bytes) on stderr; ``--json``
prints the API's JSON on stdout instead of tables. Exit codes as ``modelpress compress``:
0 ok, 2 bad input (a 4xx answer), 3 the quality gate failed the job, 1 failed (the job failed or
was cancelled, the service is unreachable or answered 5xx).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_GATE = 0, 1, 2, 3


# ----------------------------------------------------------------------------- helpers
def _client(args: argparse.Namespace):
    from modelpress.client import Client

    return Client(args.url or os.environ.get("MODELPRESS_URL"),
                  args.api_key or os.environ.get("MODELPRESS_API_KEY"), timeout=args.timeout)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _emit(args: argparse.Namespace, obj: Any, table: Callable[[Any], Any] | None = None) -> None:
    """``--json``: the API's JSON on stdout; else a rich table (or the JSON, pretty)."""
    from pydantic import BaseModel

    def plain(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        if isinstance(o, list):
            return [plain(x) for x in o]
        return o

    if args.json or table is None:
        print(json.dumps(plain(obj), indent=None if args.json else 2))
        return
    from rich.console import Console

    Console().print(table(obj))


def _table(columns: list[str], rows: list[list[Any]], title: str | None = None):
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


@contextmanager
def _bytes_bar(args: argparse.Namespace, what: str):
    """A live bytes progress bar on stderr (nothing with --json or off a terminal); yields the
    (done, total) callback."""
    if args.json or not sys.stderr.isatty() and not args.progress:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[bold]" + what, BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=_console()) as p:
        task = p.add_task(what, total=None)
        yield lambda done, total: p.update(task, completed=done, total=total)


def _job_exit(job) -> int:
    if job.state == "succeeded":
        return EXIT_OK
    if job.error is not None and job.error.code == "quality_gate":
        return EXIT_GATE
    return EXIT_FAILED


def _job_rows(jobs) -> Any:
    return _table(["id", "state", "progress", "stage", "method(s)", "created"],
                  [[j.id, j.state, f"{j.progress}%", j.stage,
                    " -> ".join(s["method"] for s in j.recipe), j.created_at.strftime(
                        "%Y-%m-%d %H:%M:%S")] for j in jobs])


def _job_detail(j) -> Any:
    rows = [["state", j.state], ["progress", f"{j.progress}%"], ["stage", j.stage],
            ["recipe", json.dumps(j.recipe)], ["attempt", j.attempt]]
    if j.error:
        rows.append(["error", f"{j.error.code}: {j.error.message}"])
    if j.artifact:
        rows.append(["artifact", f"{j.artifact.bytes} bytes sha256 {j.artifact.sha256}"])
    rows += [[f"{m.stage}/{m.name}", f"{m.value:.6g}{' ' + m.unit if m.unit else ''}"]
             for m in j.metrics]
    return _table(["job " + j.id, ""], rows)


# ----------------------------------------------------------------------------- models
def cmd_models_upload(args: argparse.Namespace) -> int:
    with _client(args) as c, _bytes_bar(args, "upload") as cb:
        m = c.upload_model(args.source, args.name, revision=args.revision, progress=cb)
    _emit(args, m, lambda m: _table(["id", "name", "kind", "model_type", "bytes"],
                                    [[m.id, m.name, m.kind, m.model_type, m.bytes]]))
    return EXIT_OK


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ms = c.list_models()
    _emit(args, ms, lambda ms: _table(["id", "name", "kind", "model_type", "bytes"],
                                      [[m.id, m.name, m.kind, m.model_type, m.bytes] for m in ms]))
    return EXIT_OK


def cmd_models_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _emit(args, c.get_model(args.model_id))
    return EXIT_OK


def cmd_models_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.delete_model(args.model_id, cascade=args.cascade)
    _emit(args, {"deleted": args.model_id})
    return EXIT_OK


# ------------------------------------------------------------------------------- jobs
def _submit_body(args: argparse.Namespace) -> dict[str, Any]:
    from modelpress.compression.cli_compress import load_recipe, parse_set

    body: dict[str, Any] = {}
    if args.recipe:
        if args.set:
            raise ValueError("--set goes with --method; give each recipe stage its params")
        body["recipe"] = load_recipe(args.recipe)
    else:
        body["method"], body["params"] = args.method, parse_set(args.set or [])
    for k in ("max_ppl_increase", "calibration_dataset_id", "eval_dataset_id", "callback_url",
              "measure", "eval_windows", "tasks_dataset_id", "prompts_dataset_id",
              "max_accuracy_drop", "max_mean_kl"):
        if getattr(args, k) is not None:
            body[k] = getattr(args, k)
    if args.keep_intermediate:
        body["keep_intermediate"] = True
    return body


def _follow(args: argparse.Namespace, c, job) -> Any:
    """Wait for the job, with a live stage/percent bar unless --json."""
    if args.json or not sys.stderr.isatty() and not args.progress:
        return c.wait(job.id, timeout=args.timeout_wait)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.fields[state]}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[stage]}"),
                  TimeElapsedColumn(), console=_console()) as p:
        task = p.add_task("job", total=100, state=job.state, stage="")

        def on_progress(snap: dict) -> None:
            p.update(task, completed=snap.get("progress") or 0, state=snap.get("state"),
                     stage=(snap.get("stage") or "")[:60])

        done = c.wait(job.id, timeout=args.timeout_wait, on_progress=on_progress)
        p.update(task, completed=done.progress, state=done.state, stage=done.stage or "")
    return done


def cmd_jobs_submit(args: argparse.Namespace) -> int:
    body = _submit_body(args)
    with _client(args) as c:
        job = c.submit(args.model_id, **body)
        if not args.wait:
            _emit(args, job, _job_detail)
            return EXIT_OK
        job = _follow(args, c, job)
        if job.state == "succeeded" and args.output:
            with _bytes_bar(args, "download") as cb:
                c.download(job.id, args.output, progress=cb)
    _emit(args, job, _job_detail)
    if job.state != "succeeded":
        _console().print(f"[red]job {job.id} {job.state}"
                         f"{': ' + job.error.message if job.error else ''}")
    return _job_exit(job)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        filters = {"state": args.state, "model_id": args.model, "method": args.method}
        if args.all:
            jobs = list(c.iter_jobs(limit=200, **filters))
        else:
            jobs = c.list_jobs(limit=args.limit, **filters).items
    _emit(args, jobs, _job_rows)
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _emit(args, c.get_job(args.job_id), _job_detail)
    return EXIT_OK


def cmd_jobs_events(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.follow:
            for ev in c.stream_events(args.job_id):
                line = ev.model_dump_json() if args.json else \
                    f"{ev.id:>8} {ev.ts:%H:%M:%S} {ev.kind:<14} {ev.message}"
                print(line, flush=True)
            return EXIT_OK
        evs = c.events(args.job_id, limit=1000).items
    _emit(args, evs, lambda evs: _table(["id", "time", "kind", "message"], [
        [e.id, e.ts.strftime("%H:%M:%S"), e.kind, e.message] for e in evs]))
    return EXIT_OK


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _emit(args, c.cancel(args.job_id), _job_detail)
    return EXIT_OK


def cmd_jobs_download(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = Path(args.output or f"{args.job_id}.tar.gz")
        with _bytes_bar(args, "download") as cb:
            c.download(args.job_id, out, progress=cb)
        art = c.get_job(args.job_id).artifact
    _emit(args, {"path": str(out), "bytes": out.stat().st_size,
                 "sha256": art.sha256 if art else None})
    return EXIT_OK


# ---------------------------------------------------------------- compare / methods
def cmd_compare(args: argparse.Namespace) -> int:
    with _client(args) as c:
        comp = c.compare(args.model_id)

    def table(comp):
        rows = [r for r in [comp.baseline, *comp.rows] if r is not None]
        return _table(["label", "state", "gate", "ratio", "ppl", "loss", "MB", "pareto"], [
            [r.label, r.state, "ok" if r.gate_passed else "FAIL", _f(r.compression_ratio),
             _f(r.perplexity), _f(r.accuracy_loss), _f((r.bytes or 0) / 1e6 if r.bytes else None),
             "*" if r.pareto else ""] for r in rows], title=f"model {comp.model_id}")

    _emit(args, comp, table)
    return EXIT_OK


def _f(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def cmd_methods(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ms = c.methods()
    _emit(args, ms, lambda ms: _table(["name", "family", "calibration", "description"], [
        [m.name, m.family, "yes" if m.needs_calibration else "", m.description[:70]]
        for m in ms]))
    return EXIT_OK


# ------------------------------------------------------------------------------ parser
def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("service")
    g.add_argument("--url", help="the service (default MODELPRESS_URL or http://127.0.0.1:8000)")
    g.add_argument("--api-key", help="an API key (default MODELPRESS_API_KEY)")
    g.add_argument("--json", action="store_true", help="print the API's JSON, no tables or bars")
    g.add_argument("--progress", action="store_true",
                   help="show progress bars even when stderr is not a terminal")
    g.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout in seconds")
    return p


def _add(sub, name: str, fn, help: str, common) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, parents=[common])
    p.set_defaults(func=functools.partial(run, fn))
    return p


def add_commands(sub) -> None:
    """Register models, jobs, compare and methods on the top-level subparsers."""
    common = _common()
    m = sub.add_parser("models", help="models on the service: upload, list, show, delete")
    ms = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    up = _add(ms, "upload", cmd_models_upload, "upload a GGUF file, an HF directory or tar, or "
              "register a hub id", common)
    up.add_argument("source", help="a local file or directory, or a hub model id")
    up.add_argument("--name")
    up.add_argument("--revision", help="hub revision")
    _add(ms, "list", cmd_models_list, "list your models", common)
    _add(ms, "show", cmd_models_show, "show a model", common).add_argument("model_id")
    d = _add(ms, "delete", cmd_models_delete, "delete a model", common)
    d.add_argument("model_id")
    d.add_argument("--cascade", action="store_true", help="also delete its jobs")

    j = sub.add_parser("jobs", help="jobs on the service: submit, list, show, events, cancel, "
                       "download")
    js = j.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    s = _add(js, "submit", cmd_jobs_submit, "submit a job", common)
    s.add_argument("model_id")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--method")
    how.add_argument("--recipe", help="JSON or YAML list of {method, params} stages")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="a param of --method")
    s.add_argument("--max-ppl-increase", type=float, help="quality gate (e.g. 1.2)")
    s.add_argument("--calibration-dataset-id")
    s.add_argument("--eval-dataset-id")
    s.add_argument("--callback-url", help="webhook for the job's state changes")
    s.add_argument("--measure", choices=["full", "quality", "none"],
                   help="what to measure (default full: quality and speed)")
    s.add_argument("--eval-windows", type=int, metavar="N",
                   help="512-token windows of each text that perplexity reads (default: the "
                   "service's, 16)")
    s.add_argument("--tasks-dataset-id")
    s.add_argument("--prompts-dataset-id")
    s.add_argument("--max-accuracy-drop", type=float, help="gate (needs --tasks-dataset-id)")
    s.add_argument("--max-mean-kl", type=float, help="gate (needs --prompts-dataset-id)")
    s.add_argument("--keep-intermediate", action="store_true")
    s.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    s.add_argument("--timeout-wait", type=float, default=None, help="with --wait: give up after")
    s.add_argument("-o", "--output", help="with --wait: download the artifact here")
    ls = _add(js, "list", cmd_jobs_list, "list your jobs (newest first)", common)
    ls.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    ls.add_argument("--model")
    ls.add_argument("--method")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--all", action="store_true", help="every page")
    _add(js, "show", cmd_jobs_show, "show a job", common).add_argument("job_id")
    ev = _add(js, "events", cmd_jobs_events, "a job's events", common)
    ev.add_argument("job_id")
    ev.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    _add(js, "cancel", cmd_jobs_cancel, "cancel a job", common).add_argument("job_id")
    dl = _add(js, "download", cmd_jobs_download, "download a job's artifact (resumable, "
              "SHA-256 checked)", common)
    dl.add_argument("job_id")
    dl.add_argument("-o", "--output", help="default <job_id>.tar.gz")

    _add(sub, "compare", cmd_compare, "compare a model's jobs (size, quality, speed)",
         common).add_argument("model_id")
    _add(sub, "methods", cmd_methods, "list the service's compression methods", common)


def run(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a remote command, mapping errors to exit codes with one line on stderr."""
    import httpx

    from modelpress.client import ApiError
    from modelpress.compression.cli_compress import BadInput

    try:
        return int(fn(args) or 0)
    except ApiError as e:
        print(f"error: {e.status} {e.code}: {e.message}", file=sys.stderr)
        return EXIT_BAD_INPUT if 400 <= e.status < 500 else EXIT_FAILED
    except httpx.HTTPError as e:
        print(f"error: cannot reach the service: {e}", file=sys.stderr)
        return EXIT_FAILED
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (BadInput, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

"""Running an evaluation: backends, the resumable results log, the concurrent loop, the summary.

Every run owns an output folder:
  run.json       what was run (command, data, model, prompt settings); a rerun with different
                 settings into the same folder is refused rather than mixing results
  results.jsonl  one JSON line per item, appended and flushed as each item finishes; a rerun
                 skips the items already there, so an interrupted run resumes where it stopped
                 (items that failed with an error are tried again)
  summary.json   the metrics, rewritten at the end of every run
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from runtime.eval.scoring import YesNoTokens, yes_no_from_logprobs, yes_no_probability


class EvalError(ValueError):
    """An evaluation that cannot run as asked (the message says why and what to do)."""


# ----------------------------------------------------------------------------- results log

class ResultsLog:
    def __init__(self, out_dir: str | Path, config: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.jsonl"
        self.config = json.loads(json.dumps(config))  # as it reads back from run.json
        run_json = self.dir / "run.json"
        if run_json.exists():
            previous = json.loads(run_json.read_text())
            if previous != self.config:
                changed = sorted(k for k in set(previous) | set(self.config) if previous.get(k) != self.config.get(k))
                raise EvalError(f"{self.dir} holds results of a different run (differs in: {', '.join(changed)}); "
                                "use another --out or delete that folder")
        else:
            run_json.write_text(json.dumps(self.config, indent=2) + "\n")
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._read()

    def _read(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # The last line was cut off mid-write (the run was killed): drop it, it is recomputed.
            keep = data.rfind(b"\n") + 1
            print(f"[facert] {self.path}: dropping an incomplete last line (interrupted write)", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        for n, line in enumerate(data.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[str(rec["id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EvalError(f"{self.path}:{n} is not a results line; delete the file to start over") from None

    def is_done(self, item_id: str) -> bool:
        rec = self.records.get(item_id)
        return rec is not None and "error" not in rec

    def append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self._lock:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()
            self.records[str(record["id"])] = record

    def write_summary(self, summary: dict) -> Path:
        path = self.dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return path


# ------------------------------------------------------------------------------ the loop

def _score_or_errors(score_group: Callable[[list], list[dict]], group: list) -> list[dict]:
    """Scores a group; an input the model refuses (bad image, prompt too long: ValueError) becomes
    an error record for that item alone, so one bad item neither stops the run nor its group."""
    try:
        return score_group(group)
    except EvalError:  # the whole run cannot go on (say, the model has no attribute head)
        raise
    except ValueError as e:
        if len(group) == 1:
            return [{"id": group[0].id, "error": str(e)}]
        return [r for item in group for r in _score_or_errors(score_group, [item])]


def run_items(items: list, score_group: Callable[[list], list[dict]], log: ResultsLog, batch_size: int,
              workers: int, desc: str) -> dict[str, dict]:
    """Scores every item not yet in the log, `batch_size` items per call and `workers` calls in
    flight, logging each record as its call returns; returns {id: record} for `items`."""
    pending = [it for it in items if not log.is_done(it.id)]
    groups = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc=desc, unit="item", file=sys.stderr,
               dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    running: set = set()
    try:
        queue = iter(groups)
        # Keep at most `workers` calls in flight, so an interrupted run has little work in the air.
        for g in queue:
            running.add(pool.submit(_score_or_errors, score_group, g))
            if len(running) >= workers:
                break
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            failure = next((f.exception() for f in finished if f.exception() is not None), None)
            for fut in finished:
                if fut.exception() is None:
                    for rec in fut.result():
                        log.append(rec)
                        bar.update(1)
                    nxt = None if failure else next(queue, None)
                    if nxt is not None:
                        running.add(pool.submit(_score_or_errors, score_group, nxt))
            if failure is not None:
                raise failure
    finally:
        # Interrupted: calls already running finish and are kept; queued ones are dropped.
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in running:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                for rec in fut.result():
                    log.append(rec)
        bar.close()
    return {it.id: log.records[it.id] for it in items if it.id in log.records}


# --------------------------------------------------------------------------------- backends

class PipelineBackend:
    """The in-process runtime (a FacePipeline from --checkpoint or --engines): up to
    `concurrency` requests share one batched generate call. Each request is a list of images
    (in prompt order) and the text after them, as FacePipeline.ask_batch takes them."""

    def __init__(self, pipeline, concurrency: int = 1, max_tiles: int | None = None):
        self.pipeline = pipeline
        self.batch_size = max(1, concurrency)
        self.workers = 1
        self.max_tiles = max_tiles
        self._yes_no: YesNoTokens | None = None

    @property
    def has_attributes(self) -> bool | None:
        return "attributes" in self.pipeline.spec

    @property
    def family(self) -> str:
        return str(self.pipeline.spec.get("family", "unknown"))

    def answer(self, images: list[list[bytes]], questions: list[str], params, yes_no: bool = False) -> list[dict]:
        answers = self.pipeline.ask_batch(images, questions, params, max_tiles=self.max_tiles)
        out = []
        for a in answers:
            r = {"text": a.text, "attributes": a.attributes, "attributes_raw": a.attributes_raw,
                 "constraints_fired": a.constraints_fired}
            if yes_no:
                if self._yes_no is None:
                    self._yes_no = YesNoTokens(self.pipeline.tokenizer, self.pipeline.c.vocab_size)
                r["p_yes"], r["p_no"] = yes_no_probability(a.first_logits.float().numpy(), self._yes_no)
            out.append(r)
        return out


class RemoteBackend:
    """A running `facert serve` (--url): one request per call, `concurrency` calls in flight,
    through runtime.client.ask_remote, with the same images and text as in-process."""

    def __init__(self, url: str, protocol: str = "grpc", concurrency: int = 8, max_tiles: int | None = None,
                 ask_remote=None):
        if ask_remote is None:
            try:
                from runtime.client import ask_remote  # the serving client; imported only for --url
            except ImportError as e:
                raise EvalError(f"--url needs the serving client (runtime.client): {e}") from None
        self.ask_remote = ask_remote
        self.url, self.protocol, self.max_tiles = url, protocol, max_tiles
        self.batch_size = 1
        self.workers = max(1, concurrency)
        self.has_attributes = None  # known from the first response
        self.family = "remote"

    def answer(self, images: list[list[bytes]], questions: list[str], params, yes_no: bool = False) -> list[dict]:
        out = []
        for request_images, question in zip(images, questions):
            resp = self.ask_remote(self.url, request_images, question, params, protocol=self.protocol,
                                   max_tiles=self.max_tiles)
            r = {"text": resp.get("text", ""), "attributes": resp.get("attributes"),
                 "attributes_raw": resp.get("attributes_raw"), "constraints_fired": resp.get("constraints_fired", [])}
            if yes_no:
                probs = yes_no_from_logprobs(resp.get("first_token_logprobs"))
                if probs is not None:
                    r["p_yes"], r["p_no"] = probs
            out.append(r)
        return out


# -------------------------------------------------------------------------------- printing

def format_table(title: str, header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    rule = "-" * len(line(cells[0]))
    return "\n".join([title, rule, line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule])


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"

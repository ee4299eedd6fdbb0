"""Benchmarks, small: the load generator through a real Triton server (streamed requests, counted and
timed), perf_analyzer where it runs, the per-stage harness on the tiny model next to transformers,
the percentile arithmetic on known timestamps, and the report writer's JSON/CSV/PNG files."""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import struct
import sys
from pathlib import Path

import pytest
from serving_fixtures import served_tiny, tiny_pipeline  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import loadgen, perf_analyzer, report  # noqa: E402
from benchmarks.stages import run_stages  # noqa: E402
from runtime.generate import SamplingParams  # noqa: E402

QUESTION = "What can you tell about this face?"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_load_generator_streams_through_the_server(served_tiny, tiny_pipeline, face_png):
    expected = tiny_pipeline.ask(face_png, QUESTION, SamplingParams(max_new_tokens=5))
    # one level, two users, three requests: the bound on the count holds across users
    row = asyncio.run(loadgen.run_level(served_tiny.grpc_url, concurrency=2, max_requests=3, max_seconds=60,
                                        image=face_png, question=QUESTION, max_tokens=5))
    assert (row["requests"], row["errors"], row["timed_out"]) == (3, 0, 0), row.get("first_error")
    assert row["model"] == "faceinsight"
    # every token of the answer arrived as its own streamed response, counted once
    assert row["output_tokens_mean"] == len(expected.token_ids)
    assert 0 < row["ttft_ms_p50"] <= row["latency_ms_p50"]
    assert row["ttft_ms_p50"] <= row["ttft_ms_p90"] <= row["ttft_ms_p99"]
    if len(expected.token_ids) > 1:
        assert row["itl_ms_p50"] > 0
    assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] == pytest.approx(
        row["requests_per_s"] * len(expected.token_ids), rel=0.01)
    # the server's own per-stage account rides on the last response
    assert row["server_prefill_ms"] > 0 and row["server_vision_ms"] > 0


def test_load_generator_loads_loopback_only():
    assert loadgen.check_loopback("127.0.0.1:8001") == "127.0.0.1:8001"
    assert loadgen.check_loopback("grpc://localhost:8001") == "localhost:8001"
    with pytest.raises(loadgen.LoadError, match="loopback"):
        loadgen.check_loopback("10.1.2.3:8001")
    with pytest.raises(loadgen.LoadError, match="HOST:PORT"):
        loadgen.check_loopback("localhost")


def test_summary_arithmetic_on_known_timestamps():
    # two requests sent at t=0 and t=1 s; tokens at known times; one failed request
    a = loadgen.RequestRecord(sent=0.0, token_times=[0.1, 0.2, 0.4], tokens=3, done=0.5)
    b = loadgen.RequestRecord(sent=1.0, token_times=[1.3, 1.4], tokens=2, done=1.5)
    failed = loadgen.RequestRecord(sent=0.0, error="refused", done=0.1)
    row = loadgen.summarize([a, b, failed], concurrency=2)
    assert (row["requests"], row["errors"], row["timed_out"]) == (2, 1, 0)
    assert row["duration_s"] == pytest.approx(1.5)
    assert row["requests_per_s"] == pytest.approx(2 / 1.5, abs=1e-3)
    assert row["output_tokens_per_s"] == pytest.approx(5 / 1.5, abs=0.01)
    assert row["ttft_ms_p50"] == pytest.approx(200.0)  # median of 100 and 300 ms
    assert row["itl_ms_p50"] == pytest.approx(100.0)  # gaps 100, 200, 100 ms
    assert row["latency_ms_p99"] == pytest.approx(500.0, abs=0.1)
    assert row["first_error"] == "refused"


def test_open_loop_arrivals_and_genai_perf_metrics():
    import numpy as np

    rng = np.random.default_rng(0)
    times = loadgen.poisson_times(4.0, 500.0, rng)
    assert len(times) == pytest.approx(2000, rel=0.05) and times == sorted(times) and times[-1] < 500
    gaps = np.diff([0.0] + times)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05) and gaps.std() == pytest.approx(0.25, rel=0.1)  # exponential
    lengths = loadgen.log_uniform_tokens(4000, 8, 256, rng)
    assert min(lengths) >= 8 and max(lengths) <= 256 and np.median(lengths) == pytest.approx(np.sqrt(8 * 256), rel=0.1)
    with pytest.raises(loadgen.LoadError, match="rate and a duration"):
        loadgen.poisson_times(0.0, 10.0, rng)
    # genai-perf's definitions on known timestamps: ITL per request = (latency - TTFT) / (tokens - 1)
    a = loadgen.RequestRecord(sent=0.0, token_times=[0.1, 0.2, 0.5], tokens=3, done=0.5)
    b = loadgen.RequestRecord(sent=1.0, token_times=[1.3], tokens=1, done=1.3)
    lost = loadgen.RequestRecord(sent=1.2)
    m = loadgen.genai_perf_metrics([a, b, lost])
    assert (m["request_count"]["avg"], m["unfinished_count"]["avg"], m["error_count"]["avg"]) == (2, 1, 0)
    assert m["time_to_first_token"]["p50"] == pytest.approx(200.0) and m["time_to_first_token"]["unit"] == "ms"
    assert m["inter_token_latency"]["avg"] == pytest.approx(200.0)  # (500 - 100) / 2; b has one token
    assert m["token_gap"]["max"] == pytest.approx(300.0)
    assert m["request_throughput"]["avg"] == pytest.approx(2 / 1.3, abs=1e-3)
    assert m["output_token_throughput"]["avg"] == pytest.approx(4 / 1.3, abs=1e-2)


def test_open_loop_sends_on_schedule_whatever_is_in_flight(served_tiny, tiny_pipeline, face_png):
    expected = tiny_pipeline.ask(face_png, QUESTION, SamplingParams(max_new_tokens=4))
    # the first answer is long, so the next sends fall while it is still in flight
    plan = [loadgen.Planned(t, [face_png], QUESTION, 4 if t else 256, tag="t") for t in (0.0, 0.05, 0.1, 0.15, 0.6)]
    records = asyncio.run(loadgen.run_open_loop(served_tiny.grpc_url, plan))
    assert all(r.ok for r in records), [r.error for r in records]
    assert all(r.token_ids[:4] == expected.token_ids for r in records)
    # sent at its time, not after the one before had its answer
    assert records[1].sent < records[0].done and records[3].sent < records[0].done
    for r, p in zip(records, plan):
        assert r.sent - records[0].sent == pytest.approx(p.at, abs=0.5)  # a loaded machine's timer slack
    assert loadgen.genai_perf_metrics(records)["request_count"]["avg"] == 5


def test_stages_on_the_tiny_model_next_to_transformers(tiny_pipeline, face_png):
    res = run_stages(None, tiny_pipeline, face_png, batches=[1, 2], n=3, repeats=1, peers=("transformers",))
    assert res["peer_errors"] == {}
    for backend in ("torch", "transformers"):
        for b in (1, 2):
            stages = {r["stage"]: r["ms"] for r in res["stages"] if r["backend"] == backend and r["batch"] == b}
            assert set(stages) == set(report.STAGE_ORDER), (backend, b)
            assert all(ms > 0 for ms in stages.values()), stages
    for r in res["requests"]:
        # the same weights and prompt: transformers' generate picks the same greedy tokens as facert's loop
        assert r["same_tokens_as_torch"] is True, r
        assert r["ttft_ms"] < r["end_to_end_ms"]
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["itl_ms"], rel=1e-2)


def test_perf_analyzer_input_is_one_serialised_request():
    data = perf_analyzer.input_data(b"\x89PNGbytes", "Smiling?", 7)["data"][0]
    raw = base64.b64decode(data["IMAGE"]["content"]["b64"])
    assert struct.unpack("<I", raw[:4])[0] == 9 and raw[4:] == b"\x89PNGbytes"  # Triton's BYTES element layout
    assert data["QUESTION"]["content"] == ["Smiling?"] and data["MAX_TOKENS"]["content"] == [7]
    assert data["STREAM"]["content"] == [True]


def test_perf_analyzer_against_the_server(served_tiny, face_png):
    try:
        rows = perf_analyzer.run(served_tiny.grpc_url, [1], face_png, QUESTION, max_tokens=3,
                                 requests_per_window=2, max_trials=3, timeout_s=120)
    except perf_analyzer.PerfAnalyzerUnavailable as e:
        pytest.skip(f"perf_analyzer does not run here: {e}")
    (row,) = rows
    assert "error" not in row, row
    assert row["concurrency"] == 1 and row["requests_per_s"] > 0
    assert 0 < row["ttft_ms_p50"] <= row["latency_ms_p99"]
    assert row["responses_per_request"] >= 2  # streamed: tokens, then the last response


def _tables() -> dict:
    serve = [{"concurrency": c, "requests": 4, "errors": 0, "timed_out": 0, "requests_per_s": 1.0 * c,
              "output_tokens_per_s": 16.0 * c, **{f"{k}_p{p}": 10.0 * c + p for k in ("ttft_ms", "itl_ms", "latency_ms")
                                                  for p in (50, 90, 99)}} for c in (1, 2, 4)]
    peer = [{"backend": "transformers", "concurrency": c, "ttft_ms": 30.0, "itl_ms": 5.0, "latency_ms": 90.0,
             "requests_per_s": 0.5 * c, "output_tokens_per_s": 8.0 * c} for c in (1, 2, 4)]
    stages = [{"backend": b, "batch": n, "stage": s, "ms": 1.0 + i} for b in ("onnxruntime", "transformers")
              for n in (1, 2) for i, s in enumerate(report.STAGE_ORDER)]
    return {"serve": serve, "peer": peer, "stages": stages, "perf_analyzer": []}


def test_report_writes_json_csv_and_plots(tmp_path):
    tables = _tables()
    record = report.new_record("test", shared="a test", settings={"x": 1})
    assert record["machine"]["cores"] >= 1 and "torch" in record["versions"] and record["git"]
    written = report.write_results(tmp_path, record, tables, markdown="# results\n")
    names = {p.name for p in written}
    assert {"results.json", "serve.csv", "peer.csv", "stages.csv", "stages.png", "latency_vs_concurrency.png",
            "throughput_vs_concurrency.png", "README.md"} <= names
    assert "perf_analyzer.csv" not in names  # empty tables write no file
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["tables"] == tables and back["machine"]["shared"] == "a test"
    assert "load_average_after" in back["machine"]
    with open(tmp_path / "serve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["concurrency"]) for r in rows] == [1, 2, 4]
    assert float(rows[2]["ttft_ms_p99"]) == tables["serve"][2]["ttft_ms_p99"]
    from matplotlib.image import imread

    for png in ("stages.png", "latency_vs_concurrency.png", "throughput_vs_concurrency.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
        h, w = imread(tmp_path / png).shape[:2]
        assert h > 200 and w > 400, png


def test_serve_table_ratios_against_the_peer():
    tables = _tables()
    text = loadgen.serve_table(tables["serve"], tables["peer"])
    line = next(ln for ln in text.splitlines() if ln.startswith("| 2 |"))
    # concurrency 2: 2.0 req/s vs the peer's 1.0 req/s; TTFT p50 70 ms vs the peer's 30 ms
    assert "| 2.00x |" in line and "| 0.43x |" in line


def test_facert_bench_is_registered():
    from runtime.cli import build_parser

    args = build_parser().parse_args(["bench", "stages", "--batches", "1,2", "--repeats", "1"])
    assert args.bench_command == "stages" and args.batches == "1,2" and callable(args.func)
    args = build_parser().parse_args(["bench", "serve", "--url", "127.0.0.1:8001", "--concurrency", "1"])
    assert args.url == "127.0.0.1:8001"

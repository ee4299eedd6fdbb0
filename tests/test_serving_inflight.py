"""In-flight batching and the caches on a real tritonserver (2.51, CPU), tiny model over the torch backend.

One in-flight server for the module, with 2 KV-cache slots and room for 2 waiting requests. Its
checkpoint is the tiny one with a 4,096-token context (config only: the weights are the same), so
that one answer can run for thousands of tokens, seconds on this machine, and the tests can act while
it runs. What they show: a short request sent while a long one generates finishes long before it,
with the same greedy tokens as alone and as in-process; a cancelled request frees its slot (the
gauges say so); a full admission queue is refused at once (and `facert_waiting_requests` shows it
full); a second question about the same image hits the encoder and prefix caches with the same
answer as without caches; a different image never takes cached rows. The static scheduler
(`facert repo --scheduler static`) still serves the in-process answer.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest

from runtime.client import RemoteError, ask_remote, error_kind
from runtime.generate import SamplingParams

QUESTION = "What can you tell about this face?"
OTHER_QUESTION = "Describe the hair."
LONG_QUESTION = OTHER_QUESTION  # the tiny model answers it with 3,000 tokens and more (no stop token)
SHORT = SamplingParams(max_new_tokens=12)
LONG = 2000  # tokens: seconds of generation here, so that the tests can act while it runs
SLOTS, WAITING = 2, 2


@pytest.fixture(scope="module")
def reference(tiny_long_checkpoint):
    """The in-process pipeline: no scheduler, no caches."""
    from runtime.pipeline import FacePipeline

    return FacePipeline.from_checkpoint(tiny_long_checkpoint)


def start_server(repo: Path):
    from runtime.serving.server import ServerError, TritonServer, free_ports

    http, grpc, metrics = free_ports(3)
    log: list[str] = []
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log=log.append,
                          provision_log=lambda _m: None, exit_timeout_s=3)
    try:
        server.start(timeout_s=300)
    except ServerError as e:
        pytest.fail(f"tritonserver did not start: {e}\n--- last log lines ---\n" + "\n".join(log[-40:]))
    return server


@pytest.fixture(scope="module")
def server(tiny_long_checkpoint, tmp_path_factory):
    from runtime.serving.repo import fill_repository

    repo = tmp_path_factory.mktemp("inflight") / "repository"
    fill_repository(repo, checkpoint=tiny_long_checkpoint, kv_slots=SLOTS, max_queue_size=WAITING,
                    slot_tokens=4096, prefill_chunk=64)
    server = start_server(repo)
    yield server
    server.stop()


def metrics(server) -> dict[str, float]:
    """facert_* samples: {"name{label=value,...}": value} with the labels in their served order."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("facert_")}


def gauge(m: dict, name: str) -> float:
    return m[f'{name}{{model="llm"}}']


def slots_are(server, waiting: int, active: int, within_s: float = 60.0) -> dict:
    """Wait until the llm step's gauges read (waiting, active, SLOTS - active)."""
    deadline = time.monotonic() + within_s
    while True:
        m = metrics(server)
        got = (gauge(m, "facert_waiting_requests"), gauge(m, "facert_active_slots"), gauge(m, "facert_free_slots"))
        if got == (waiting, active, SLOTS - active):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"gauges (waiting, active, free) = {got}, not {(waiting, active, SLOTS - active)}")
        time.sleep(0.1)


def encoder_counts(m: dict, kind: str) -> dict[str, float]:
    return {step: m.get(f'facert_encoder_cache_{kind}_total{{model="{step}"}}', 0.0)
            for step in ("vision_encoder", "face_parser", "seg_projection", "attribute_head")}


class Streaming:
    """One streamed request on its own gRPC stream, answered in the background (tritonclient.grpc)."""

    def __init__(self, url: str, image: bytes, max_tokens: int, question: str = LONG_QUESTION):
        import tritonclient.grpc as grpcclient

        from runtime.client import Request, _grpc_inputs

        self.tokens: list[int] = []
        self.finish = ""
        self.error: str | None = None
        self.first = threading.Event()
        self.done = threading.Event()
        self.sent_at = time.perf_counter()
        self.done_at: float | None = None
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._on_response)
        self.client.async_stream_infer("faceinsight", _grpc_inputs(Request(image, question),
                                                                   SamplingParams(max_new_tokens=max_tokens), True))

    def _on_response(self, result, error) -> None:
        if error is not None:
            self.error = error.message() if hasattr(error, "message") else str(error)
        else:
            ids = result.as_numpy("TOKEN_IDS")
            if ids is not None:
                self.tokens += ids.reshape(-1).tolist()
            if self.tokens:
                self.first.set()
            finish = result.as_numpy("FINISH_REASON")
            self.finish = bytes(finish.reshape(-1)[0]).decode() if finish is not None else ""
        if error is not None or self.finish:
            self.done_at = time.perf_counter()
            self.done.set()

    def wait_first(self, timeout_s: float = 60.0) -> None:
        assert self.first.wait(timeout_s) or self.done.is_set(), "no token came"
        assert self.error is None, self.error

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()

    def wait(self, timeout_s: float = 120.0) -> None:
        assert self.done.wait(timeout_s), "the request did not end"
        self.client.stop_stream()
        self.client.close()


# ------------------------------------------------------------------------------------ config

def test_repository_writes_the_scheduler_and_its_bounds(tiny_checkpoint, tmp_path):
    from runtime.cli import main
    from runtime.serving.repo import RepositoryError, fill_repository, parse_config

    assert main(["repo", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "a"), "--kv-slots", "3",
                 "--slot-tokens", "300", "--prefill-chunk", "32", "--prefix-cache-mb", "0",
                 "--encoder-cache-mb", "1.5", "--max-queue-size", "5"]) == 0
    llm = parse_config(tmp_path / "a" / "llm" / "config.pbtxt")
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert {k: params[k] for k in ("scheduler", "kv_slots", "slot_tokens", "prefill_chunk", "max_waiting",
                                   "prefix_cache_bytes")} == {
        "scheduler": "inflight", "kv_slots": "3", "slot_tokens": "300", "prefill_chunk": "32", "max_waiting": "5",
        "prefix_cache_bytes": "0"}
    assert llm.dynamic_batching.max_queue_delay_microseconds == 0  # handed over at once: execute only queues
    for step in ("vision_encoder", "face_parser", "seg_projection", "attribute_head"):
        cfg = parse_config(tmp_path / "a" / step / "config.pbtxt")
        assert cfg.parameters["encoder_cache_bytes"].string_value == str(int(1.5 * 2**20)), step
        assert any(i.name == "IMAGE_KEY" and i.optional for i in cfg.input), step
    assert main(["repo", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "s"), "--scheduler",
                 "static"]) == 0
    static = parse_config(tmp_path / "s" / "llm" / "config.pbtxt")
    assert static.parameters["scheduler"].string_value == "static"
    assert static.dynamic_batching.max_queue_delay_microseconds == 2000
    with pytest.raises(RepositoryError, match="scheduler must be one of"):
        fill_repository(tmp_path / "x", checkpoint=tiny_checkpoint, scheduler="eager")
    with pytest.raises(RepositoryError, match=r"slot_tokens must be in \[2, 512\]"):
        fill_repository(tmp_path / "y", checkpoint=tiny_checkpoint, slot_tokens=4096)


# ------------------------------------------------------------------------------------ served

def test_a_short_request_joins_a_long_one_and_leaves_long_before_it(server, reference, face_png, face_images):
    alone = ask_remote(server.grpc_url, face_png, QUESTION, SHORT, stream=True)
    expected = reference.ask(face_png, QUESTION, SHORT)
    assert alone["token_ids"] == expected.token_ids and alone["text"] == expected.text
    long_alone = Streaming(server.grpc_url, face_images[0], LONG)
    long_alone.wait()

    long = Streaming(server.grpc_url, face_images[0], LONG)
    try:
        long.wait_first()
        t0 = time.perf_counter()
        joined = ask_remote(server.grpc_url, face_png, QUESTION, SHORT, stream=True)
        short_s, long_tokens_then = time.perf_counter() - t0, len(long.tokens)
        long.wait()
    finally:
        long.cancel()
    # the same greedy tokens alone, joined mid-flight and in-process; the long answer's 2,000 tokens
    # are the same with and without the short one beside it (and its prefix from the cache)
    assert joined["token_ids"] == alone["token_ids"] and joined["text"] == alone["text"]
    assert long.error is None and long.finish == long_alone.finish == "length", (long.error, long.finish)
    assert long.tokens == long_alone.tokens and len(long.tokens) == LONG
    # runtime.generate in-process runs other kernels (a cache as long as this answer, not a slot):
    # the same tokens over hundreds of them, not necessarily over thousands
    assert long.tokens[:300] == reference.ask(face_images[0], LONG_QUESTION, SamplingParams(max_new_tokens=300)).token_ids
    # it finished while the long one had most of its answer still to come
    assert long_tokens_then < LONG / 2, f"the long answer had {long_tokens_then} of {LONG} tokens"
    assert long.done_at - (t0 + short_s) > 2 * short_s
    # and joined the running batch at once: no wait for a slot
    assert joined["timings"]["llm_queue_ms"] < 1000, joined["timings"]


def test_cancellation_frees_the_slot(server, face_png):
    slots_are(server, 0, 0)
    before = metrics(server)
    long = Streaming(server.grpc_url, face_png, LONG)
    long.wait_first()
    slots_are(server, 0, 1)
    long.cancel()
    after = slots_are(server, 0, 0)
    key = 'facert_llm_requests_total{model="llm",outcome="cancelled"}'
    assert after[key] == before[key] + 1
    assert len(long.tokens) < LONG


def test_a_full_admission_queue_is_refused_at_once(server, face_png, face_images):
    slots_are(server, 0, 0)
    before = metrics(server)
    streams = []
    try:
        for _ in range(SLOTS):
            streams.append(Streaming(server.grpc_url, face_images[0], LONG))
            streams[-1].wait_first()
        slots_are(server, 0, SLOTS)
        for _ in range(WAITING):
            streams.append(Streaming(server.grpc_url, face_images[0], LONG))
        slots_are(server, WAITING, SLOTS)  # facert_waiting_requests: what an autoscaler reads
        t0 = time.perf_counter()
        with pytest.raises(RemoteError) as e:
            ask_remote(server.grpc_url, face_png, QUESTION, SHORT, stream=True)
        refused_s = time.perf_counter() - t0
        assert all(not s.done.is_set() for s in streams), "a long answer ended before the refusal"
    finally:
        for s in streams:
            s.cancel()
    message = str(e.value)
    assert "Exceeds maximum queue size" in message and "KV-cache slots" in message, message
    assert error_kind(message) == "overloaded" and refused_s < 2.0, (message, refused_s)
    after = slots_are(server, 0, 0)
    key = 'facert_llm_requests_total{model="llm",outcome="overloaded"}'
    assert after[key] == before[key] + 1
    assert server.is_ready()


def test_a_second_question_on_the_same_image_hits_both_caches(server, reference, face_images):
    image = face_images[1]  # not sent before on this server
    m0 = metrics(server)
    first = ask_remote(server.grpc_url, image, QUESTION, SHORT, stream=True)
    m1 = metrics(server)
    second = ask_remote(server.grpc_url, image, OTHER_QUESTION, SHORT, stream=True)
    m2 = metrics(server)
    # the same answers as without any cache
    for got, question in ((first, QUESTION), (second, OTHER_QUESTION)):
        expected = reference.ask(image, question, SHORT)
        assert got["token_ids"] == expected.token_ids and got["text"] == expected.text, question
    assert first["timings"]["prefix_cached_tokens"] == 0 < second["timings"]["prefix_cached_tokens"]
    hits, misses = 'facert_prefix_cache_hits_total{model="llm"}', 'facert_prefix_cache_misses_total{model="llm"}'
    assert (m1[hits] - m0[hits], m1[misses] - m0[misses]) == (0, 1)
    assert (m2[hits] - m1[hits], m2[misses] - m1[misses]) == (1, 0)
    for step in ("vision_encoder", "face_parser", "seg_projection", "attribute_head"):
        assert encoder_counts(m1, "misses")[step] - encoder_counts(m0, "misses")[step] == 1, step
        assert encoder_counts(m2, "hits")[step] - encoder_counts(m1, "hits")[step] == 1, step
        assert encoder_counts(m2, "misses")[step] == encoder_counts(m1, "misses")[step], step
    ttft = 'facert_time_to_first_token_seconds_count{model="llm"}'
    itl = 'facert_inter_token_latency_seconds_count{model="llm"}'
    assert m2[ttft] - m0[ttft] == 2 and m2[itl] - m0[itl] == 2 * (SHORT.max_new_tokens - 1)


def test_two_different_images_never_share_cached_rows(server, reference, face_images):
    """The same question about another image: the prompt ids are the same (placeholders included),
    the image is not, so nothing comes from either cache, and the answer is that image's own."""
    asked, other = face_images[1], face_images[2]  # face_images[1]'s prefix is cached by now
    before = metrics(server)
    got = ask_remote(server.grpc_url, other, OTHER_QUESTION, SHORT, stream=True)
    after = metrics(server)
    expected = reference.ask(other, OTHER_QUESTION, SHORT)
    assert got["token_ids"] == expected.token_ids and got["text"] == expected.text
    assert expected.token_ids != reference.ask(asked, OTHER_QUESTION, SHORT).token_ids  # the image matters
    assert got["timings"]["prefix_cached_tokens"] == 0
    hits, misses = 'facert_prefix_cache_hits_total{model="llm"}', 'facert_prefix_cache_misses_total{model="llm"}'
    assert (after[hits] - before[hits], after[misses] - before[misses]) == (0, 1)
    assert encoder_counts(after, "hits") == encoder_counts(before, "hits")


@pytest.mark.slow
def test_the_static_scheduler_still_serves_the_in_process_answer(tiny_long_checkpoint, reference, face_images,
                                                                 tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from runtime.serving.repo import fill_repository

    fill_repository(tmp_path / "repository", checkpoint=tiny_long_checkpoint, scheduler="static")
    server = start_server(tmp_path / "repository")
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda img: ask_remote(server.grpc_url, img, QUESTION, SHORT, stream=True),
                                    face_images + face_images[:1]))
        m = metrics(server)
    finally:
        server.stop()
    for got, image in zip(answers, face_images + face_images[:1]):
        expected = reference.ask(image, QUESTION, SHORT)
        assert got["token_ids"] == expected.token_ids and got["text"] == expected.text
    assert not any(k.startswith(("facert_waiting_requests", "facert_prefix_cache")) for k in m)
    assert m['facert_llm_requests_total{model="llm",outcome="length"}'] == 4

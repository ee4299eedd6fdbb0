"""In-flight batching without Triton: the KV-cache slots of both LLM backends against transformers'
own forward, and the scheduler (runtime/serving/scheduler.py) driven step by step on the tiny
model's real LLM (torch and onnxruntime): greedy tokens alone = joined mid-flight = runtime.generate,
a short request leaves before a long one, cancellation and timeouts free slots, overload is refused
at once, prefill is chunked within its bound, and the prefix cache gives the same tokens and is never
shared across keys. The served tests are in test_serving_inflight.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from runtime.client import error_kind
from runtime.generate import SamplingParams, TorchLLM, generate
from runtime.serving.caches import BytesLRU, content_key
from runtime.serving.scheduler import GenRequest, InflightScheduler, Overloaded, SchedulerConfig, SchedulerObserver


@pytest.fixture(scope="module")
def tiny_hf(tiny_checkpoint):
    from runtime.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)[0].llm


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def llm(request, tiny_hf, tiny_engines):
    if request.param == "torch":
        return TorchLLM(tiny_hf)
    from runtime.engines import open_components

    return open_components(tiny_engines).llm


def prompts(hidden: int, lengths, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, hidden, generator=g) * 0.5 for n in lengths]


def reference_logits(hf, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(inputs_embeds=x[None]).logits[0, -1]


def assert_close(actual, expected, what):
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= 1e-4 * max(expected.abs().max().item(), 1e-6), f"{what}: max abs error {err:.3g}"


# ---------------------------------------------------------------------------------- the slots

def test_slots_give_each_row_its_own_length_position_and_mask(llm, tiny_hf):
    """Rows of different lengths, one prompt prefilled in two chunks, then decode steps over all rows
    and over a sub-range: every row's logits are transformers' on that row's sequence alone."""
    seqs = prompts(tiny_hf.config.hidden_size, (9, 4, 13, 6))
    slots = llm.new_slots(4, 32)
    for r, x in enumerate(seqs):
        if r == 2:
            llm.forward_slots(slots, x[None, :5], r, torch.tensor([0]))
            logits = llm.forward_slots(slots, x[None, 5:], r, torch.tensor([5]))
        else:
            logits = llm.forward_slots(slots, x[None], r, torch.tensor([0]))
        assert_close(logits[0], reference_logits(tiny_hf, x), f"prefill of row {r}")
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        new = torch.randn(4, 1, tiny_hf.config.hidden_size, generator=g) * 0.5
        logits = llm.forward_slots(slots, new, 0, torch.tensor([len(x) for x in seqs]))
        for r in range(4):
            seqs[r] = torch.cat([seqs[r], new[r]])
            assert_close(logits[r], reference_logits(tiny_hf, seqs[r]), f"decode step {step}, row {r}")
    new = torch.randn(2, 1, tiny_hf.config.hidden_size, generator=g) * 0.5
    logits = llm.forward_slots(slots, new, 1, torch.tensor([len(seqs[1]), len(seqs[2])]))
    for j, r in enumerate((1, 2)):
        assert_close(logits[j], reference_logits(tiny_hf, torch.cat([seqs[r], new[j]])), f"rows 1-2, row {r}")
    # row 0 and row 3 were not touched by the last call
    with pytest.raises(ValueError, match="outside the 4 slots"):
        llm.forward_slots(slots, new, 3, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="runs past a slot's 32 positions"):
        llm.forward_slots(slots, new[:1], 0, torch.tensor([32]))


def test_a_decoded_row_is_bitwise_the_same_whatever_runs_beside_it(llm, tiny_hf):
    """What batch invariance rests on: in the shape the backend decodes `n` active slots in
    (slot_rows), row 0's logits do not change with n nor with the other rows' inputs."""
    hidden = tiny_hf.config.hidden_size
    slots = llm.new_slots(4, 32)
    for r, x in enumerate(prompts(hidden, (9, 4, 13, 6), seed=12)):
        llm.forward_slots(slots, x[None], r, torch.tensor([0]))
    starts = torch.tensor([9, 4, 13, 6])
    g = torch.Generator().manual_seed(13)
    token = torch.randn(1, 1, hidden, generator=g)
    seen = []
    for n in (1, 2, 3, 4, 4):
        rows = llm.slot_rows(n, 4)
        others = torch.randn(rows - 1, 1, hidden, generator=g)
        logits = llm.forward_slots(slots, torch.cat([token, others]), 0, starts[:rows])
        seen.append(logits[0])
    assert all(torch.equal(seen[0], x) for x in seen[1:]), [float((seen[0] - x).abs().max()) for x in seen[1:]]


# ------------------------------------------------------------------------------ the scheduler

class Recorder(SchedulerObserver):
    def __init__(self):
        self.gauge_history: list[tuple[int, int, int]] = []
        self.hits = self.misses = 0
        self.ttft: list[float] = []
        self.itl: list[float] = []

    def gauges(self, waiting, active, free):
        self.gauge_history.append((waiting, active, free))

    def prefix_cache(self, hit):
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def first_token(self, seconds):
        self.ttft.append(seconds)

    def inter_token(self, seconds):
        self.itl.append(seconds)


class Job:
    """A GenRequest with what it received."""

    def __init__(self, embeds, params, **kw):
        self.tokens: list[int] = []
        self.outcome = None
        self.stop_reason = ""
        self.done = threading.Event()
        self.req = GenRequest(embeds, params, on_token=self.tokens.append, on_done=self._done,
                              should_stop=lambda: self.stop_reason, **kw)

    def _done(self, outcome):
        self.outcome = outcome
        self.done.set()


def scheduler(llm, observer=None, **config) -> InflightScheduler:
    return InflightScheduler(llm, (), SchedulerConfig(**{"slots": 4, "slot_tokens": 64, **config}), observer)


def run_until(s: InflightScheduler, jobs, max_steps: int = 500) -> int:
    for n in range(max_steps):
        if all(j.outcome is not None for j in jobs):
            return n
        s.step()
    raise AssertionError("the jobs did not finish")


def test_greedy_tokens_alone_joined_mid_flight_and_in_generate_are_the_same(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (11, 5, 17))
    long, short = SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=6)
    expected = [generate(llm, [x], prm).tokens[0] for x, prm in zip(p, (long, short, long))]
    assert len(set(map(tuple, expected))) > 1  # different prompts, different answers

    alone = []
    for x, prm in zip(p, (long, short, long)):
        s = scheduler(llm)
        job = Job(x, prm)
        s.submit(job.req)
        run_until(s, [job])
        alone.append(job.tokens)
    assert alone == expected

    s = scheduler(llm)
    first = Job(p[0], long)
    s.submit(first.req)
    for _ in range(5):
        s.step()
    later = [Job(p[1], short), Job(p[2], long)]
    for j in later:
        s.submit(j.req)
    run_until(s, [first] + later)
    assert [first.tokens] + [j.tokens for j in later] == expected
    assert [j.outcome.reason for j in [first] + later] == ["length"] * 3


def test_sampled_tokens_follow_the_request_seed_whatever_runs_beside(llm, tiny_hf):
    x, other = prompts(tiny_hf.config.hidden_size, (8, 12), seed=4)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    expected = generate(llm, [x], params).tokens[0]
    s = scheduler(llm)
    busy = Job(other, SamplingParams(max_new_tokens=20, temperature=1.0, seed=1))
    s.submit(busy.req)
    s.step()
    job = Job(x, params)
    s.submit(job.req)
    run_until(s, [busy, job])
    assert job.tokens == expected


def test_a_short_request_leaves_long_before_a_long_one(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (10, 10), seed=2)
    s = scheduler(llm)
    long, short = Job(p[0], SamplingParams(max_new_tokens=50)), Job(p[1], SamplingParams(max_new_tokens=3))
    s.submit(long.req)
    s.step()
    s.step()
    s.submit(short.req)
    steps = 0
    while short.outcome is None:
        s.step()
        steps += 1
    assert steps <= 4 and long.outcome is None and short.outcome.reason == "length" and len(short.tokens) == 3
    assert s.free == 3  # its slot is free at once
    run_until(s, [long])
    assert len(long.tokens) == 50


def test_cancellation_and_timeouts_free_their_slots(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (6, 7, 8), seed=3)
    rec = Recorder()
    s = scheduler(llm, rec, slots=2)
    jobs = [Job(x, SamplingParams(max_new_tokens=40)) for x in p]
    for j in jobs:
        s.submit(j.req)
    s.step()
    assert (s.waiting, s.active, s.free) == (1, 2, 0) and rec.gauge_history[-1] == (1, 2, 0)
    jobs[0].stop_reason = "cancelled"  # running
    jobs[2].stop_reason = "timeout"  # still waiting
    s.step()
    assert jobs[0].outcome.reason == "cancelled" and jobs[2].outcome.reason == "timeout"
    assert jobs[2].outcome.tokens == [] and 0 < len(jobs[0].outcome.tokens) < 40
    assert (s.waiting, s.active, s.free) == (0, 1, 1) and rec.gauge_history[-1] == (0, 1, 1)
    jobs[1].stop_reason = "cancelled"
    s.step()
    assert (s.waiting, s.active, s.free) == (0, 0, 2) and rec.gauge_history[-1] == (0, 0, 2)


def test_a_request_waits_for_a_slot_no_longer_than_its_bound(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (6, 6), seed=14)
    s = scheduler(llm, slots=1)
    busy, late = Job(p[0], SamplingParams(max_new_tokens=30)), Job(p[1], SamplingParams(max_new_tokens=3),
                                                                     max_wait_s=0.05)
    s.submit(busy.req)
    s.step()
    s.submit(late.req)
    time.sleep(0.1)
    s.step()
    assert late.outcome.reason == "timeout" and late.outcome.tokens == []
    assert "waited" in str(late.outcome.error) and "over the 50 ms queue timeout" in str(late.outcome.error)
    assert busy.outcome is None and s.waiting == 0


def test_held_back_requests_sit_out_and_a_failing_check_ends_only_its_request(llm, tiny_hf):
    """may_continue() False keeps a request out of the decode step (its tokens stay the same), and a
    request whose should_stop() raises ends with that error while the others go on."""
    p = prompts(tiny_hf.config.hidden_size, (7, 9, 5), seed=15)
    params = SamplingParams(max_new_tokens=10)
    expected = [generate(llm, [x], params).tokens[0] for x in p]
    s = scheduler(llm)
    allowed = {"go": True}
    held = Job(p[0], params, may_continue=lambda: allowed["go"])
    free = Job(p[1], params)

    def broken():
        raise RuntimeError("the flag store is gone")

    failing = Job(p[2], params)
    failing.req.should_stop = broken
    for j in (held, free):
        s.submit(j.req)
    s.step()
    allowed["go"] = False
    before = len(held.tokens)
    for _ in range(3):
        s.step()
    assert len(held.tokens) == before and len(free.tokens) == before + 3
    s.submit(failing.req)
    s.step()
    assert failing.outcome.reason == "error" and "flag store is gone" in str(failing.outcome.error)
    allowed["go"] = True
    run_until(s, [held, free])
    assert [held.tokens, free.tokens] == expected[:2]


def test_a_full_admission_queue_is_refused_at_once(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (5, 5, 5, 5), seed=5)
    s = scheduler(llm, slots=1, max_waiting=2)
    jobs = [Job(x, SamplingParams(max_new_tokens=4)) for x in p]
    s.submit(jobs[0].req)
    s.step()  # jobs[0] takes the slot
    s.submit(jobs[1].req)
    s.submit(jobs[2].req)
    with pytest.raises(Overloaded) as e:
        s.submit(jobs[3].req)
    assert "Exceeds maximum queue size" in str(e.value) and error_kind(str(e.value)) == "overloaded"
    run_until(s, jobs[:3])
    assert all(j.outcome.reason == "length" for j in jobs[:3])
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_tokens \(5\) = 65 tokens, over the 64"):
        s.submit(Job(torch.zeros(60, tiny_hf.config.hidden_size), SamplingParams(max_new_tokens=5)).req)


def test_prefill_is_chunked_within_its_bound_while_others_decode(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (6, 40, 33), seed=6)
    expected = [generate(llm, [x], SamplingParams(max_new_tokens=8)).tokens[0] for x in p]
    s = scheduler(llm, prefill_chunk=16)
    jobs = [Job(x, SamplingParams(max_new_tokens=8 if i else 30)) for i, x in enumerate(p)]
    s.submit(jobs[0].req)
    s.step()
    s.submit(jobs[1].req)
    s.submit(jobs[2].req)
    tokens_before, prefilled = len(jobs[0].tokens), []
    for _ in range(6):
        s.step()
        prefilled.append(s.last_step["prefill_tokens"])
    # 40 = 16 + 16 + 8 and 33 = 16 + 16 + 1: chunks cut at multiples of 16, at most 16 per iteration
    assert prefilled == [16, 16, 8, 16, 16, 1], prefilled
    assert len(jobs[0].tokens) == tokens_before + 6  # a token every iteration while the others prefilled
    run_until(s, jobs)
    assert jobs[0].tokens[:8] == expected[0] and [j.tokens for j in jobs[1:]] == expected[1:]


def test_prefix_cache_reuses_rows_for_the_same_key_only(llm, tiny_hf):
    """Two prompts with the same 20-token prefix and key: the second copies the rows and prefills only
    its rest, with the same tokens as without the cache; a third prompt with the same length of
    prefix but other embeddings (another image) and another key gets its own rows."""
    hidden = tiny_hf.config.hidden_size
    prefix, other_prefix = prompts(hidden, (20, 20), seed=8)
    q1, q2 = prompts(hidden, (5, 7), seed=9)
    a, b, c = torch.cat([prefix, q1]), torch.cat([prefix, q2]), torch.cat([other_prefix, q2])
    params = SamplingParams(max_new_tokens=10)
    expected = [generate(llm, [x], params).tokens[0] for x in (a, b, c)]
    rec = Recorder()
    s = scheduler(llm, rec)
    jobs = [Job(a, params, prefix_key="image-1", prefix_len=20), Job(b, params, prefix_key="image-1", prefix_len=20),
            Job(c, params, prefix_key="image-2", prefix_len=20)]
    s.submit(jobs[0].req)
    run_until(s, jobs[:1])
    for j in jobs[1:]:
        s.submit(j.req)
    run_until(s, jobs)
    assert [j.tokens for j in jobs] == expected
    assert [j.outcome.prefix_tokens for j in jobs] == [0, 20, 0]
    assert (rec.hits, rec.misses) == (1, 2)
    assert len(s.prefixes) == 2 and s.prefixes.bytes > 0
    off = scheduler(llm, prefix_cache_bytes=0)
    job = Job(b, params, prefix_key="image-1", prefix_len=20)
    off.submit(job.req)
    run_until(off, [job])
    assert job.outcome.prefix_tokens == 0 and job.tokens == expected[1] and len(off.prefixes) == 0


def test_scheduler_thread_serves_concurrent_submissions(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (4, 9, 13, 6, 8, 5), seed=10)
    params = [SamplingParams(max_new_tokens=n) for n in (3, 12, 7, 20, 1, 9)]
    expected = [generate(llm, [x], prm).tokens[0] for x, prm in zip(p, params)]
    rec = Recorder()
    s = scheduler(llm, rec, slots=3)
    s.start()
    try:
        jobs = [Job(x, prm) for x, prm in zip(p, params)]
        threads = [threading.Thread(target=s.submit, args=(j.req,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for j in jobs:
            assert j.done.wait(60), "a request did not finish"
    finally:
        s.stop()
    assert [j.tokens for j in jobs] == expected
    assert len(rec.ttft) == 6 and len(rec.itl) == sum(prm.max_new_tokens - 1 for prm in params)
    assert rec.gauge_history[-1] == (0, 0, 3)


def test_stopping_ends_every_request_with_an_error(llm, tiny_hf):
    p = prompts(tiny_hf.config.hidden_size, (4, 5), seed=11)
    s = scheduler(llm, slots=1)
    jobs = [Job(x, SamplingParams(max_new_tokens=50)) for x in p]
    for j in jobs:
        s.submit(j.req)
    s.step()
    s.stop()
    assert [j.outcome.reason for j in jobs] == ["error", "error"]
    assert "shutting down" in str(jobs[0].outcome.error)
    with pytest.raises(RuntimeError, match="shutting down"):
        s.submit(jobs[0].req)


# ------------------------------------------------------------------------------- the caches

def test_bytes_lru_evicts_least_recently_used_within_its_bound():
    c = BytesLRU(100)
    assert c.put("a", 1, 40) and c.put("b", 2, 40)
    assert c.get("a") == 1  # a is now the most recent
    assert c.put("c", 3, 40)  # evicts b
    assert "b" not in c and c.get("b") is None and c.get("c") == 3
    assert (c.hits, c.misses, c.evictions, c.bytes) == (2, 1, 1, 80)
    assert not c.put("huge", 4, 101) and "huge" not in c
    off = BytesLRU(0)
    assert not off.enabled and not off.put("a", 1, 1) and off.get("a") is None
    with pytest.raises(ValueError):
        BytesLRU(-1)


def test_content_keys_separate_their_parts():
    assert content_key(b"ab", b"c") != content_key(b"a", b"bc")
    assert content_key(b"x") == content_key("x") and len(content_key(b"x")) == 64

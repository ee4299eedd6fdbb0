"""Replicas on one machine, as a Kubernetes Service spreads them: two `facert serve` processes over one
model repository on different ports, the load generator's command line (benchmarks/loadgen.py
--url A,B) spreading its virtual users over both; every request answered, the answers equal, and
each replica's own metrics count the requests the load generator says it sent there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUESTS, USERS, MAX_TOKENS = 12, 4, 6


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _metric(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.mark.slow
def test_two_replicas_share_the_load(tiny_checkpoint, tmp_path, face_png):
    from runtime.client import ask_remote
    from runtime.generate import SamplingParams
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import free_ports

    repo = tmp_path / "repo"
    fill_repository(repo, checkpoint=tiny_checkpoint)
    ports = free_ports(6)
    replicas = [dict(zip(("http", "grpc", "metrics"), ports[i:i + 3])) for i in (0, 3)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs, logs = [], []
    for i, r in enumerate(replicas):
        logs.append(tmp_path / f"replica{i}.log")
        cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(repo),
               "--http-port", str(r["http"]), "--grpc-port", str(r["grpc"]), "--metrics-port", str(r["metrics"]),
               "--timeout", "600"]
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    try:
        deadline = time.monotonic() + 600
        while not all(_ready(r["http"]) for r in replicas):
            for p, log in zip(procs, logs):
                if p.poll() is not None:
                    pytest.fail(f"a replica exited ({p.returncode}):\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the replicas were not ready in 600 s:\n" + "\n".join(lg.read_text()[-2000:] for lg in logs))
            time.sleep(1)

        urls = [f"127.0.0.1:{r['grpc']}" for r in replicas]
        load = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), "--url", ",".join(urls),
             "--concurrency", str(USERS), "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS),
             "--max-seconds", "300", "--warmup", "0", "--json"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert load.returncode == 0, load.stderr[-3000:]
        (row,) = json.loads(load.stdout)
        assert (row["requests"], row["errors"], row["timed_out"]) == (REQUESTS, 0, 0), row.get("first_error")
        assert row["distinct_answers"] == 1  # greedy: the same answer from either replica
        per_replica = row["requests_per_url"]
        assert set(per_replica) == set(urls) and sum(per_replica.values()) == REQUESTS
        # users i and i + 2 send to replica i; each user takes a request at once, then one whenever it is done
        assert all(n >= USERS // len(urls) for n in per_replica.values()), per_replica

        # each replica counted its own share, in Triton's and in facert's own metrics
        for r, url in zip(replicas, urls):
            with urllib.request.urlopen(f"http://127.0.0.1:{r['metrics']}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            assert _metric(text, "nv_inference_request_success", model=row["model"]) == per_replica[url]
            assert _metric(text, "facert_llm_requests_total") == per_replica[url]
            assert _metric(text, "facert_generated_tokens_total") == per_replica[url] * row["output_tokens_mean"]

        # and the answer is the same token for token when asked of each replica directly
        answers = [ask_remote(url, face_png, "What can you tell about this face?", SamplingParams(max_new_tokens=8))
                   for url in urls]
        assert answers[0]["token_ids"] == answers[1]["token_ids"] and answers[0]["text"] == answers[1]["text"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
    assert codes == [0, 0], "\n".join(lg.read_text()[-2000:] for lg in logs)  # SIGTERM: a clean stop

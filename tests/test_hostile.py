"""No client can crash, hijack or exhaust the server: a real tritonserver 2.51 behind facert's gateway,
serving the tiny checkpoint, against what a hostile client does. Streams cancelled at once do not take
it down; the internal steps, tritonserver's own ports and its APIs outside inference are not reachable;
gzip bodies are refused without being inflated; the gateway names what is wrong with a request before
tritonserver sees it. (The malformed corpus as a whole: tests/test_reliability.py.)"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import served_tiny, tiny_pipeline  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.corpus import ADMIN_CALLS, Malformed, _b, _gzip_bomb, send_malformed  # noqa: E402
from benchmarks.memory import rss_mb  # noqa: E402
from benchmarks.soak import Record, run_load  # noqa: E402
from runtime.client import ask_remote  # noqa: E402
from runtime.generate import SamplingParams  # noqa: E402

QUESTION = "What can you tell about this face?"
STEPS = ("preprocessing", "vision_encoder", "attribute_head", "face_parser", "seg_projection", "llm", "postprocessing")


# ------------------------------------------------------------------------------- request checks

def test_gateway_checks_requests_against_the_ensemble_config(tiny_checkpoint, tmp_path):
    from tritonclient.grpc import service_pb2

    from runtime.serving.gateway import check_generate_body, check_infer_request, load_public_models
    from runtime.serving.repo import fill_repository

    fill_repository(tmp_path / "repo", checkpoint=tiny_checkpoint)
    models = load_public_models(tmp_path / "repo")
    assert list(models) == ["faceinsight"] and models["faceinsight"].decoupled  # only the ensemble is public

    def request(model="faceinsight", **tensors):
        req = service_pb2.ModelInferRequest(model_name=model)
        for name, (datatype, shape, raw) in tensors.items():
            req.inputs.add(name=name, datatype=datatype, shape=shape)
            req.raw_input_contents.append(raw)
        return req

    question = len(b"hi").to_bytes(4, "little") + b"hi"
    ok = request(QUESTION=("BYTES", [1, 1], question), MAX_TOKENS=("INT32", [1, 1], np.int32(5).tobytes()))
    assert check_infer_request(ok, models) is None
    cases = {
        "unknown model: 'llm'": request("llm", QUESTION=("BYTES", [1, 1], question)),
        "unexpected inference input 'QUESTON'": request(QUESTON=("BYTES", [1, 1], question)),
        "'MAX_TOKENS' data-type is 'INT64', but model 'faceinsight' expects 'INT32'":
            request(MAX_TOKENS=("INT64", [1, 1], np.int64(5).tobytes())),
        "unexpected shape for input 'MAX_TOKENS' for model 'faceinsight'. Expected [-1,1], got [1,2]":
            request(MAX_TOKENS=("INT32", [1, 2], np.int32([5, 6]).tobytes())),
        "batch-size must be <= 8": request(MAX_TOKENS=("INT32", [9, 1], np.zeros(9, np.int32).tobytes())),
        "input 'MAX_TOKENS' has 8 bytes of data, its shape [1, 1] of INT32 needs 4":
            request(MAX_TOKENS=("INT32", [1, 1], np.int64(5).tobytes())),
        "input 'QUESTION': its 7 bytes are not a sequence of length-prefixed strings":
            request(QUESTION=("BYTES", [1, 1], question + b"x")),
        "input 'QUESTION' holds 2 strings": request(QUESTION=("BYTES", [1, 1], question * 2)),
    }
    for expected, req in cases.items():
        error = check_infer_request(req, models)
        assert error is not None and expected in error, (expected, error)
    params = request(QUESTION=("BYTES", [1, 1], question))
    params.parameters["facert_cancel_key"].string_param = "0" * 32  # only the gateway sets it
    assert "unknown request parameter 'facert_cancel_key'" in check_infer_request(params, models)
    shm = request(QUESTION=("BYTES", [1, 1], question))
    shm.inputs[0].parameters["shared_memory_region"].string_param = "evil"
    assert "shared memory is not available" in check_infer_request(shm, models)

    model = models["faceinsight"]
    assert check_generate_body({"QUESTION": "hi", "MAX_TOKENS": 4, "TOP_P": 1, "STREAM": True}, model) is None
    for body, expected in (({"QESTION": "hi"}, "unknown input 'QESTION'"),
                           ({"MAX_TOKENS": "ten"}, "input 'MAX_TOKENS' (INT32) must be an integer"),
                           ({"MAX_TOKENS": 2**40}, "input 'MAX_TOKENS' (INT32) must be an integer in"),
                           ({"STREAM": 1}, "input 'STREAM' (BOOL) must be true or false"),
                           ({"TEMPERATURE": True}, "input 'TEMPERATURE' (FP32) must be a number"),
                           ({"QUESTION": ["a", "b"]}, "input 'QUESTION' takes one value, got a list of 2"),
                           ([1, 2], "must be a JSON object")):
        assert expected in check_generate_body(body, model), body


def test_seed_outside_32_bits_is_refused():
    """torch's CPU generator keeps only the low 32 bits of a seed; a seed it cannot honour is refused."""
    from runtime.errors import RequestError

    assert SamplingParams(seed=2**32 - 1).validate().seed == 2**32 - 1
    for seed in (2**32, 2**32 + 5, -1):
        with pytest.raises(RequestError, match=r"seed must be in \[0, 4294967295\]"):
            SamplingParams(seed=seed).validate()


# -------------------------------------------------------------------------------- cancellation

def test_streams_cancelled_at_once_never_take_the_server_down(served_tiny, tiny_pipeline, face_png):
    """200 gRPC streams cancelled 0-50 ms after sending (the request still in the first steps), 8 at a
    time, while 20 normal requests are asked one after the other: tritonserver is never restarted and
    every normal request is answered, as in-process. (Before the fix, tritonserver 2.51 died of SIGSEGV
    within the first 100-200 such streams here.) The flood offers more requests than the steps run, so
    their bounded queues refuse some at once as overloaded; a normal request refused so is asked
    again, as a client does under back-pressure."""
    from runtime.client import RemoteError

    server = served_tiny.server
    pid, gateway_pid, restarts = server.proc.pid, server.gateway.pid, len(server.restarts)
    rng = random.Random(14)
    plan = [(Record(i, "cancel", max_tokens=64, cancel_at_s=round(rng.uniform(0.0, 0.05), 4)),
             {"image": 0, "question": QUESTION, "temperature": 0.0, "seed": i}) for i in range(200)]
    params = SamplingParams(max_new_tokens=8)
    retries = []

    def ask() -> dict:
        for attempt in range(60):
            try:
                return ask_remote(server.grpc_url, face_png, QUESTION, params, stream=True)
            except RemoteError as e:
                if e.kind != "overloaded":
                    raise
                retries.append(attempt)
                time.sleep(0.5)
        raise AssertionError("still overloaded after 60 tries")

    async def scenario():
        flood = asyncio.ensure_future(run_load(server.grpc_url, "faceinsight", plan, [face_png], 8, 300.0, 120.0))
        answers = [await asyncio.to_thread(ask) for _ in range(20)]
        return await flood, answers

    records, answers = asyncio.run(scenario())

    assert server.proc.pid == pid and server.proc.poll() is None and len(server.restarts) == restarts
    assert server.gateway.pid == gateway_pid and server.gateway.poll() is None
    assert not any("Signal (11)" in line for line in served_tiny.log)
    assert len(records) == 200 and all(r.outcome == "cancelled" for r in records), \
        [r for r in records if r.outcome != "cancelled"][:3]
    expected = tiny_pipeline.ask(face_png, QUESTION, params)
    for got in answers:
        assert got["token_ids"] == expected.token_ids and got["finish_reason"] == expected.finish_reason
    print(f"normal requests refused as overloaded and asked again: {len(retries)}")


# ------------------------------------------------------------------------ what is not reachable

def test_internal_steps_and_apis_outside_inference_are_not_reachable(served_tiny, face_png):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    server = served_tiny.server
    for step in STEPS:  # by name, over both protocols
        grpc_error = send_malformed(Malformed(step, "", model=step), server.grpc_url, server.http_url, face_png)
        http_error = send_malformed(Malformed(step, "", model=step, endpoint="infer", raw=b"{}"), server.grpc_url,
                                    server.http_url, face_png)
        assert f"unknown model: '{step}' is not found" in grpc_error and "unknown model" in http_error, step
    for name in ADMIN_CALLS:  # repository, shared memory, trace, log settings (statistics are readable)
        error = send_malformed(Malformed(name, "", admin=name), server.grpc_url, server.http_url, face_png)
        assert error is not None and "is not available on this server" in error, (name, error)
    assert all(server.models_ready().values())  # nothing was unloaded
    with grpcclient.InferenceServerClient(server.grpc_url) as client:  # what clients see of the server
        assert [m.name for m in client.get_model_repository_index().models] == ["faceinsight"]
        assert client.is_model_ready("faceinsight") and client.get_model_metadata("faceinsight").name == "faceinsight"

    # tritonserver's own ports (loopback) answer nothing without the server's key
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{server.internal_http_port}/v2/models/llm", timeout=10)
    assert e.value.code == 403 and "restricted" in e.value.read().decode()
    with grpcclient.InferenceServerClient(f"127.0.0.1:{server.internal_grpc_port}") as client:
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_metadata("llm")


def test_gzip_bodies_do_not_grow_the_server(served_tiny, face_png):
    """A 100 KB gzip body that inflates to 100 MiB, three times to every endpoint a client can reach (and
    to the internal steps' /infer, which Triton 2.51 inflated and kept): refused before inflating."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    server = served_tiny.server
    bomb = _gzip_bomb()
    assert len(bomb) < 200_000
    paths = [f"/v2/models/faceinsight/{e}" for e in ("generate", "generate_stream", "infer")] + \
            [f"/v2/models/{s}/infer" for s in STEPS] + ["/v2/repository/index", "/v2/models/faceinsight/versions/1/infer"]

    def memory() -> float:
        return (rss_mb(server.proc.pid) or 0.0) + (rss_mb(server.gateway.pid) or 0.0)

    before = memory()
    for path in paths:
        for _ in range(3):
            req = urllib.request.Request(f"http://{server.http_url}{path}", data=bomb, method="POST",
                                         headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 415 and "compressed request bodies" in e.value.read().decode(), path
    # a gzip-compressed gRPC message: refused before it is inflated too
    req = service_pb2.ModelInferRequest(model_name="faceinsight")
    req.inputs.add(name="QUESTION", datatype="BYTES", shape=[1, 1])
    req.raw_input_contents.append((50 << 20).to_bytes(4, "little") + b" " * (50 << 20))
    with grpc.insecure_channel(server.grpc_url, compression=grpc.Compression.Gzip,
                               options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                next(iter(stub.ModelStreamInfer(iter([req]))))
            assert "Compression algorithm 'gzip' is disabled" in e.value.details()
    grown = memory() - before
    assert grown < 32, f"tritonserver + gateway grew by {grown:.0f} MB over {3 * len(paths) + 3} gzip bodies"


def test_refusals_carry_no_python_internals(served_tiny, face_png):
    """What a client reads in an error is facert's or Triton's message, never a traceback or a repr."""
    cases = [Malformed("not an image", "", (("IMAGE", _b(b"GIF89a not really"), "BYTES"),)),
             Malformed("random bytes", "", (("IMAGE", _b(bytes(range(256)) * 4), "BYTES"),)),
             Malformed("json for a step", "", model="postprocessing", endpoint="infer", raw=b"{]"),
             Malformed("http junk", "", raw=b"\xff\xfe{")]
    for case in cases:
        error = send_malformed(case, served_tiny.grpc_url, served_tiny.http_url, face_png)
        assert error, case.name
        for internal in ("Traceback", 'File "', "<_io.", " object at 0x", "Expecting value", "Error(\""):
            assert internal not in error, (case.name, error)
    body = json.dumps({"IMAGE_BASE64": "", "QUESTION": QUESTION, "MAX_TOKENS": 4}).encode()
    assert "image is empty" in send_malformed(Malformed("empty", "", raw=body), served_tiny.grpc_url,
                                              served_tiny.http_url, face_png)

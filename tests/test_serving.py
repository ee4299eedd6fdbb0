"""Serving over a real Triton server (nvidia-pytriton's tritonserver 2.51, CPU): the ensemble streams
the same greedy answer as the in-process pipeline over gRPC and HTTP, serves concurrent requests,
exposes metrics, and refuses bad input with a message naming the problem."""

from __future__ import annotations

import base64
import json
import queue
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import served_tiny, tiny_pipeline  # noqa: F401 (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.corpus import _b, _png, _png_header  # noqa: E402 (the malformed corpus's builders)
from runtime.client import RemoteError, ask_remote  # noqa: E402
from runtime.generate import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_new_tokens=10)
QUESTION = "What can you tell about this face?"


def _check_same_answer(served: dict, expected) -> None:
    assert served["token_ids"] == expected.token_ids
    assert served["text"] == expected.text
    assert served["finish_reason"] == expected.finish_reason
    # attribute probabilities cross process boundaries as FP32 tensors: same numbers, same constraints
    assert served["attributes"].keys() == expected.attributes.keys()
    np.testing.assert_allclose([served["attributes"][k] for k in expected.attributes],
                               list(expected.attributes.values()), rtol=1e-5, atol=1e-6)
    assert served["constraints_fired"] == expected.constraints_fired


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_streamed_answer_equals_in_process(served_tiny, tiny_pipeline, face_png, protocol):
    expected = tiny_pipeline.ask(face_png, QUESTION, GREEDY)
    pieces: list[str] = []
    served = ask_remote(served_tiny.url(protocol), face_png, QUESTION, GREEDY, protocol=protocol, stream=True,
                        on_text=pieces.append)
    assert len(pieces) > 1, "the answer arrived in one piece: not streamed"
    assert "".join(pieces) == served["text"]
    _check_same_answer(served, expected)
    t = served["timings"]
    for stage in ("preprocess", "vision", "parser", "seg", "attributes", "prefill", "decode", "total"):
        assert t[f"{stage}_ms"] > 0, stage
    assert t["total_ms"] >= t["prefill_ms"] + t["decode_ms"]

    whole = ask_remote(served_tiny.url(protocol), face_png, QUESTION, GREEDY, protocol=protocol, stream=False)
    _check_same_answer(whole, expected)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_multi_image_request_served_equals_in_process(served_tiny, tiny_pipeline, face_images, protocol):
    """Three images in one FaceInsight request (image and seg rows of each, every image's attributes)."""
    expected = tiny_pipeline.ask(face_images, QUESTION, GREEDY)
    served = ask_remote(served_tiny.url(protocol), face_images, QUESTION, GREEDY, protocol=protocol, stream=True)
    _check_same_answer(served, expected)
    assert served["prompt_tokens"] == expected.prompt_tokens
    assert len(served["image_attributes"]) == len(expected.image_attributes) == 3
    for got, want in zip(served["image_attributes"], expected.image_attributes):
        np.testing.assert_allclose([got["attributes_raw"][k] for k in want["attributes_raw"]],
                                   list(want["attributes_raw"].values()), rtol=1e-5, atol=1e-6)
    # a conversation with a system turn, its image parts taking the images in order
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION},
                                             {"type": "image"}]}]
    expected = tiny_pipeline.ask(face_images[:2], messages=messages, params=GREEDY)
    served = ask_remote(served_tiny.url(protocol), face_images[:2], None, GREEDY, protocol=protocol,
                        messages=messages)
    assert served["token_ids"] == expected.token_ids


def _metrics(served) -> dict[tuple[str, str], float]:
    """{(metric, model): value} from the Prometheus endpoint."""
    with urllib.request.urlopen(served.server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("nv_inference_") and 'model="' in line:
            metric = line.split("{", 1)[0]
            model = line.split('model="', 1)[1].split('"', 1)[0]
            out[metric, model] = float(line.rsplit(" ", 1)[1])
    return out


def test_sixteen_concurrent_requests_all_correct(served_tiny, tiny_pipeline, face_images):
    jobs = [(face_images[i % len(face_images)], f"Request {i}: describe the hair.", "grpc" if i % 2 else "http")
            for i in range(16)]
    params = SamplingParams(max_new_tokens=6)
    before = _metrics(served_tiny)
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask_remote, served_tiny.url(p), img, q, params, protocol=p, stream=bool(i % 3))
                   for i, (img, q, p) in enumerate(jobs)]
        results = [f.result(timeout=120) for f in futures]
    expected = tiny_pipeline.ask_batch([img for img, _, _ in jobs], [q for _, q, _ in jobs], params)
    for got, want in zip(results, expected):
        _check_same_answer(got, want)
    after = _metrics(served_tiny)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["nv_inference_request_success", "faceinsight"] == 16
    # the dynamic batcher put several of the waiting requests into one LLM execution
    assert delta["nv_inference_count", "llm"] == 16
    assert delta["nv_inference_exec_count", "llm"] < 16


def test_metrics_endpoint_counts_requests(served_tiny, face_png):
    before = _metrics(served_tiny)
    ask_remote(served_tiny.grpc_url, face_png, QUESTION, SamplingParams(max_new_tokens=2), stream=True)
    after = _metrics(served_tiny)

    def delta(metric: str, model: str) -> float:
        return after[metric, model] - before.get((metric, model), 0.0)

    for model in ("faceinsight", "preprocessing", "vision_encoder", "face_parser", "seg_projection",
                  "attribute_head", "llm"):
        assert delta("nv_inference_request_success", model) == 1, model
    # two tokens streamed plus the closing response: postprocessing ran once per LLM response
    assert delta("nv_inference_count", "postprocessing") == 3
    assert delta("nv_inference_request_duration_us", "faceinsight") > 0


# ------------------------------------------------------------------------------------- bad input

def _grpc_error(url: str, tensors: list[tuple[str, np.ndarray, str]]) -> str | None:
    """Send raw tensors over the gRPC stream; the error message, or None if the request succeeded."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        inputs = []
        for name, array, dtype in tensors:
            t = grpcclient.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            inputs.append(t)
        client.async_stream_infer("faceinsight", inputs, enable_empty_final_response=True)
        while True:
            result, error = responses.get(timeout=60)
            if error is not None:
                return error.message()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    finally:
        client.stop_stream()
        client.close()


BAD_GRPC = {
    "zero-byte image": ([("IMAGE", _b(b""), "BYTES")], "image is empty"),
    "undecodable image": ([("IMAGE", _b(b"GIF89a but not really"), "BYTES")], "cannot decode image"),
    "image over the pixel bound": ([("IMAGE", _b(_png_header(8000, 6000)), "BYTES")], "8000x6000 = 48000000 pixels, over the 40000000-pixel bound"),
    "wrong dtype": ([("MAX_TOKENS", np.array([[5.0]], np.float32), "FP32")], "'MAX_TOKENS' data-type is 'FP32'"),
    "wrong shape": ([("MAX_TOKENS", np.array([[5, 6]], np.int32), "INT32")], "unexpected shape for input 'MAX_TOKENS'"),
    "two requests in one (batch of 2)": ([("IMAGE", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES"),
                                   ("QUESTION", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES"),
                                   ("MAX_TOKENS", np.array([[4], [4]], np.int32), "INT32")],
                                  "IMAGE must be [1, N] (one request's N images)"),
    "missing image": ([("IMAGE", None, None)], "the image is missing"),
    "missing question": ([("QUESTION", None, None)], "the question is missing"),
    "empty question": ([("QUESTION", _b(b"   "), "BYTES")], "question is empty"),
    "over-long question": ([("QUESTION", _b(b"x" * 600), "BYTES")], "prompt is 652 tokens, over the model's"),
    "max_tokens zero": ([("MAX_TOKENS", np.array([[0]], np.int32), "INT32")], "max_tokens must be in [1, 4096], got 0"),
    "max_tokens too large": ([("MAX_TOKENS", np.array([[5000]], np.int32), "INT32")], "max_tokens must be in [1, 4096]"),
    "top_p zero": ([("TOP_P", np.array([[0.0]], np.float32), "FP32")], "top_p must be in (0, 1]"),
    "unknown input": ([("PROMPT", _b(b"hi"), "BYTES")], "unexpected inference input 'PROMPT'"),
}


@pytest.mark.parametrize("case", list(BAD_GRPC))
def test_bad_input_over_grpc_is_named(served_tiny, face_png, case):
    changes, message = BAD_GRPC[case]
    tensors = {"IMAGE": (_b(face_png), "BYTES"), "QUESTION": (_b(QUESTION.encode()), "BYTES"),
               "MAX_TOKENS": (np.array([[4]], np.int32), "INT32")}
    for name, array, dtype in changes:
        if array is None:
            tensors.pop(name)
        else:
            tensors[name] = (array, dtype)
    error = _grpc_error(served_tiny.grpc_url, [(n, a, d) for n, (a, d) in tensors.items()])
    assert error is not None, f"{case}: the server accepted it"
    assert message in error, f"{case}: {error!r}"


BAD_HTTP = {
    "invalid base64": ({"IMAGE_BASE64": "not base64!"}, "IMAGE_BASE64 item 1 is not valid base64"),
    "zero-byte image": ({"IMAGE_BASE64": ""}, "image is empty"),
    "wrong type": ({"MAX_TOKENS": "ten"}, "input 'MAX_TOKENS' (INT32) must be an integer"),
    "misspelt input": ({"QESTION": "hi"}, "unknown input 'QESTION'"),
    "image over the pixel bound": ({"IMAGE_BASE64": base64.b64encode(_png_header(9000, 9000)).decode()},
                                   "over the 40000000-pixel bound"),
    "empty question": ({"QUESTION": ""}, "question is empty"),
    "missing question": ({"QUESTION": None}, "the question is missing"),
    "max_tokens out of range": ({"MAX_TOKENS": -1}, "max_tokens must be in [1, 4096]"),
}


@pytest.mark.parametrize("case", list(BAD_HTTP))
def test_bad_input_over_http_is_named(served_tiny, face_png, case):
    change, message = BAD_HTTP[case]
    body = {"IMAGE_BASE64": base64.b64encode(face_png).decode(), "QUESTION": QUESTION, "MAX_TOKENS": 4, **change}
    body = {k: v for k, v in body.items() if v is not None}
    req = urllib.request.Request(f"http://{served_tiny.http_url}/v2/models/faceinsight/generate",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    error = json.loads(e.value.read())["error"]
    assert message in error, f"{case}: {error!r}"


def test_good_request_after_bad_ones_is_still_correct(served_tiny, tiny_pipeline, face_png):
    for case in ("zero-byte image", "wrong dtype", "over-long question"):  # and the whole bad-input suite, if run
        test_bad_input_over_grpc_is_named(served_tiny, face_png, case)
    expected = tiny_pipeline.ask(face_png, QUESTION, GREEDY)
    _check_same_answer(ask_remote(served_tiny.grpc_url, face_png, QUESTION, GREEDY, stream=True), expected)
    _check_same_answer(ask_remote(served_tiny.http_url, face_png, QUESTION, GREEDY, protocol="http"), expected)


def test_client_raises_the_servers_message(served_tiny):
    with pytest.raises(RemoteError, match="cannot decode image"):
        ask_remote(served_tiny.grpc_url, b"\x89PNG broken", QUESTION, GREEDY)
    with pytest.raises(RemoteError, match="question is empty"):
        ask_remote(served_tiny.http_url, _png(16, 16), " ", GREEDY, protocol="http", stream=True)


def test_cli_ask_url_streams_the_answer(served_tiny, tiny_pipeline, face_png, tmp_path, capsys):
    from runtime.cli import main

    image = tmp_path / "face.png"
    image.write_bytes(face_png)
    expected = tiny_pipeline.ask(face_png, QUESTION, GREEDY)
    assert main(["ask", str(image), QUESTION, "--url", served_tiny.grpc_url, "--stream", "--max-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(expected.text)
    assert "timings:" in out and "constraint rules fired" in out and "seeded RANDOM weights" in out
    assert main(["ask", str(image), QUESTION, "--url", served_tiny.http_url, "--protocol", "http", "--json",
                 "--max-tokens", "10"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == expected.token_ids and got["model"] == "faceinsight"
    assert main(["ask", str(image), " ", "--url", served_tiny.grpc_url]) == 2
    assert "question is empty" in capsys.readouterr().err


def test_facellm_ensemble_serves_the_in_process_answer(tiny_facellm_checkpoint, tmp_path, face_png):
    """The family without the segmentation branch: its own ensemble, same client, same answer."""
    from runtime.pipeline import FacePipeline
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports

    fill_repository(tmp_path / "repo", checkpoint=tiny_facellm_checkpoint)
    http, grpc, metrics = free_ports(3)
    with TritonServer(tmp_path / "repo", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log=lambda _l: None, exit_timeout_s=3) as server:
        served = ask_remote(server.grpc_url, face_png, QUESTION, GREEDY, stream=True)
    expected = FacePipeline.from_checkpoint(tiny_facellm_checkpoint).ask(face_png, QUESTION, GREEDY)
    assert served["model"] == "facellm"
    assert served["token_ids"] == expected.token_ids and served["text"] == expected.text
    assert served["attributes"] is None and expected.attributes is None

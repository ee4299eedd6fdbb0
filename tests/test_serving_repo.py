"""`facert repo`: the generated repositories parse as Triton ModelConfigs and are wired right;
`facert serve` refuses a taken port, an invalid repository and a model that fails to load, clearly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.serving.repo import RepositoryError, fill_repository, parse_config, steps_made_ready, validate_repository
from runtime.serving.server import ServerError, TritonServer, free_ports


def _step_models(cfg) -> list[str]:
    return [s.model_name for s in cfg.ensemble_scheduling.step]


def test_faceinsight_repository_has_every_step_and_the_seg_branch(tiny_checkpoint, tmp_path):
    configs = fill_repository(tmp_path / "repo", checkpoint=tiny_checkpoint, max_batch_size=4)
    ens = configs["faceinsight"]
    assert ens.platform == "ensemble"
    assert _step_models(ens) == ["preprocessing", "vision_encoder", "attribute_head", "face_parser",
                                 "seg_projection", "llm", "postprocessing"]
    # one step at a time: no finished step makes two ready at once (Triton 2.51 would then be able to
    # answer a request twice, and its gRPC frontend crashes on the second answer)
    assert steps_made_ready(ens) == [("", ["preprocessing"]), ("preprocessing", ["vision_encoder"]),
                                     ("vision_encoder", ["attribute_head"]), ("attribute_head", ["face_parser"]),
                                     ("face_parser", ["seg_projection"]), ("seg_projection", ["llm"]),
                                     ("llm", ["postprocessing"]), ("postprocessing", [])]
    assert [t.name for t in configs["face_parser"].input] == ["PARSER_PIXELS", "AFTER_MS", "IMAGE_KEY"]
    llm = configs["llm"]
    assert llm.model_transaction_policy.decoupled
    assert {t.name for t in llm.input} >= {"INPUT_IDS", "IMAGE_TOKENS", "SEG_TOKENS", "GENERATION"}
    # shapes come from the checkpoint: the LLM width of tiny is 64
    dims = {t.name: list(t.dims) for t in llm.input}
    # rows per request vary (every tile of every image); the width is the LLM's
    assert dims["IMAGE_TOKENS"] == [-1, 64] and dims["SEG_TOKENS"] == [-1, 64]
    for name in ("vision_encoder", "face_parser", "seg_projection", "attribute_head"):
        assert configs[name].max_batch_size == 4 and configs[name].dynamic_batching is not None
        assert len(configs[name].model_warmup) == 1
        assert configs[name].instance_group[0].kind == configs[name].instance_group[0].KIND_CPU
    # every output of the ensemble comes from postprocessing (the decoupled path)
    post = ens.ensemble_scheduling.step[-1]
    assert set(post.output_map.values()) == {t.name for t in ens.output}
    params = configs["vision_encoder"].parameters
    assert params["checkpoint"].string_value == str(tiny_checkpoint.resolve())
    card = json.loads(ens.parameters["model_card"].string_value)
    assert "llm" in card["random_parts"]


def test_facellm_repository_has_no_seg_branch(tiny_facellm_checkpoint, tmp_path):
    configs = fill_repository(tmp_path / "repo", checkpoint=tiny_facellm_checkpoint)
    assert sorted(configs) == ["facellm", "llm", "postprocessing", "preprocessing", "vision_encoder"]
    assert _step_models(configs["facellm"]) == ["preprocessing", "vision_encoder", "llm", "postprocessing"]
    assert all(len(made) <= 1 for _, made in steps_made_ready(configs["facellm"]))
    assert "SEG_TOKENS" not in {t.name for t in configs["llm"].input}


def test_engines_give_the_same_shapes_as_the_checkpoint(tiny_checkpoint, tmp_path):
    from export.build import Progress, build_engines

    engines = build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "engines", progress=Progress(4, quiet=True))
    from_ckpt = fill_repository(tmp_path / "a", checkpoint=tiny_checkpoint)
    from_engines = fill_repository(tmp_path / "b", engines=engines)
    for name in from_ckpt:
        a, b = from_ckpt[name], from_engines[name]
        assert [(t.name, list(t.dims)) for t in a.input] == [(t.name, list(t.dims)) for t in b.input], name
        assert [(t.name, list(t.dims)) for t in a.output] == [(t.name, list(t.dims)) for t in b.output], name
    assert from_engines["llm"].parameters["engines"].string_value == str(engines.resolve())

    native = fill_repository(tmp_path / "native", engines=engines, target="native")
    for name in ("vision_encoder", "face_parser", "seg_projection", "attribute_head"):
        # python models on the GPU running the folder's engines (a request's tiles are one [1, R, ...] tensor)
        assert native[name].backend == "python"
        assert native[name].instance_group[0].kind == native[name].instance_group[0].KIND_GPU
        assert native[name].parameters["engines"].string_value == str(engines.resolve())
    # native too runs one step at a time (every step is a python model)
    assert all(len(made) <= 1 for _, made in steps_made_ready(native["faceinsight"]))
    assert native["llm"].backend == "python" and "llm_backend" not in native["llm"].parameters

    # a folder built for TensorRT-LLM: plans for the encoders, the tensorrtllm backend for the LLM
    trt = tmp_path / "trtllm-engines"
    shutil.copytree(engines, trt)
    manifest = json.loads((trt / "manifest.json").read_text())
    for name in ("vision", "parser", "seg", "attributes"):
        manifest["components"][name]["kind"] = "plan"
    (trt / "llm_engine").mkdir()
    (trt / "llm_engine" / "rank0.engine").write_bytes(b"")
    manifest["components"]["vision"]["max_batch"] = 4  # the plan's profile ends at batch 4
    manifest["components"]["llm"] = {"file": "llm_engine/rank0.engine", "kind": "tensorrt-llm-engine",
                                     "precision": "int4", "dtype": "bf16", "quant_algo": "W4A16", "data_files": [],
                                     "max_batch": 8, "max_input_len": 600, "max_output_len": 64}
    (trt / "manifest.json").write_text(json.dumps(manifest))
    native = fill_repository(tmp_path / "native-trtllm", engines=trt, backend="tensorrt-llm", target="native")
    assert native["vision_encoder"].parameters["backend"].string_value == "tensorrt-llm"
    trtllm = native["tensorrt_llm"]
    assert trtllm.backend == "tensorrtllm" and trtllm.model_transaction_policy.decoupled
    assert trtllm.parameters["gpt_model_path"].string_value == str(trt.resolve() / "llm_engine")
    table = next(t for t in trtllm.input if t.name == "prompt_embedding_table")
    from tritonclient.grpc import model_config_pb2

    assert table.data_type == model_config_pb2.TYPE_BF16  # an int4 engine's activations (its dtype)
    assert native["llm"].parameters["llm_backend"].string_value == "tensorrtllm"
    # the KV cache is bounded by what the engine can hold, not only by a share of free GPU memory
    params = {k: v.string_value for k, v in trtllm.parameters.items()}
    assert params["max_tokens_in_paged_kv_cache"] == str(8 * (600 + 64))
    assert float(params["kv_cache_free_gpu_mem_fraction"]) <= 0.5
    inputs = {t.name: t for t in trtllm.input}
    # every input the BLS request sends is declared, with the tensorrtllm backend's types
    for name, dtype in (("runtime_top_k", "TYPE_INT32"), ("random_seed", "TYPE_UINT64"), ("seed", "TYPE_UINT64"),
                        ("stop_words_list", "TYPE_INT32"), ("runtime_top_p", "TYPE_FP32"), ("temperature", "TYPE_FP32")):
        assert inputs[name].data_type == getattr(model_config_pb2, dtype), name
    assert list(inputs["stop_words_list"].dims) == [2, -1]


def test_tensorrt_llm_bls_request():
    """The request the llm step sends the tensorrt_llm model (through BLS): greedy is runtime_top_k 1
    (argmax) with no temperature; sampling sends top-p, temperature and the seed under both names the
    tensorrtllm backends read (random_seed up to v0.19, seed from v0.20); every end token but the first
    and every stop token go as stop_words_list in the backend's [1, 2, N] layout; every name and dtype
    matches what the native config declares."""
    from runtime.generate import SamplingParams
    from runtime.serving.native import stop_words_list, tensorrt_llm_inputs

    ids = np.array([[5, 6, 320, 321, 7]], np.int64)
    greedy = tensorrt_llm_inputs(ids, SamplingParams(max_new_tokens=9), (2, 7), table_rows=2)
    assert greedy["runtime_top_k"].tolist() == [[1]] and "temperature" not in greedy and "seed" not in greedy
    assert greedy["input_ids"].dtype == np.int32 and greedy["input_ids"].tolist() == [[5, 6, 320, 321, 7]]
    assert greedy["input_lengths"].tolist() == [[5]] and greedy["request_output_len"].tolist() == [[9]]
    assert greedy["end_id"].tolist() == [[2]] and greedy["prompt_vocab_size"].tolist() == [[2]]
    assert greedy["stop_words_list"].tolist() == [[[7], [1]]]  # the second end token stops the engine too

    sampled = tensorrt_llm_inputs(ids, SamplingParams(temperature=0.7, top_p=0.9, seed=123, stop_token_ids=(11, 2)),
                                  (2,), table_rows=2)
    assert sampled["runtime_top_k"].tolist() == [[0]]
    assert sampled["temperature"].dtype == np.float32 and np.isclose(sampled["temperature"][0, 0], 0.7)
    assert np.isclose(sampled["runtime_top_p"][0, 0], 0.9)
    assert sampled["random_seed"].dtype == sampled["seed"].dtype == np.uint64
    assert sampled["random_seed"].tolist() == sampled["seed"].tolist() == [[123]]
    assert sampled["stop_words_list"].tolist() == [[[11], [1]]]  # 2 is end_id already
    assert "stop_words_list" not in tensorrt_llm_inputs(ids, SamplingParams(), (2,), 2)
    assert stop_words_list([3, 9, 4]).tolist() == [[[3, 9, 4], [1, 2, 3]]]

    template = (Path(__file__).resolve().parents[1] / "model_repository" / "native" / "tensorrt_llm.pbtxt.j2").read_text()
    types = {np.int32: "TYPE_INT32", np.uint64: "TYPE_UINT64", np.float32: "TYPE_FP32", np.bool_: "TYPE_BOOL"}
    for name, array in {**greedy, **sampled}.items():
        assert f'name: "{name}" data_type: {types[array.dtype.type]}' in template, name


def test_invalid_configs_are_refused_with_file_and_reason(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    fill_repository(repo, checkpoint=tiny_checkpoint)
    with pytest.raises(RepositoryError, match="exists and is not empty"):
        fill_repository(repo, checkpoint=tiny_checkpoint)

    cfg = repo / "seg_projection" / "config.pbtxt"
    good = cfg.read_text()
    cfg.write_text(good + "\nmax_batch: 3\n")
    with pytest.raises(RepositoryError, match=r"seg_projection/config.pbtxt:\d+:\d+ .*max_batch"):
        validate_repository(repo)
    cfg.write_text(good.replace('name: "LABELS"', 'name: "LABEL_MAP"', 1))
    with pytest.raises(RepositoryError, match="step 'seg_projection' has no input 'LABELS'"):
        validate_repository(repo)
    cfg.write_text(good)
    shutil.rmtree(repo / "attribute_head")
    with pytest.raises(RepositoryError, match="runs 'attribute_head', which is not in the repository"):
        validate_repository(repo)
    with pytest.raises(RepositoryError, match="does not exist"):
        parse_config(repo / "nope" / "config.pbtxt")


def test_serve_refuses_a_taken_port_and_an_invalid_repository(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    fill_repository(repo, checkpoint=tiny_checkpoint)
    http, grpc, metrics = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc))
        taken.listen()
        with pytest.raises(ServerError, match=f"grpc port {grpc} on 127.0.0.1 is taken"):
            TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics).start()
        with pytest.raises(ServerError, match=f"OpenAI port {grpc} on 127.0.0.1 is taken .*--openai-port"):
            TritonServer(repo, http_port=http, grpc_port=free_ports(1)[0], metrics_port=metrics,
                         openai_port=grpc).start()
    with pytest.raises(ServerError, match="the http, grpc, metrics, openai ports must differ"):
        TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, openai_port=http).start()
    with pytest.raises(ServerError, match="the OpenAI endpoint is served by the gateway"):
        TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, openai_port=free_ports(1)[0],
                     gateway=False).start()
    (repo / "llm" / "config.pbtxt").write_text('name: "llm"\nbackend: "python"\nbogus_field: 1\n')
    with pytest.raises(ServerError, match="invalid model repository .*llm/config.pbtxt.*bogus_field"):
        TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics).start()


def test_serve_reports_a_model_that_fails_to_load(tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    fill_repository(repo, checkpoint=tiny_checkpoint)
    for d in repo.iterdir():  # one model is enough to see how a load failure is reported
        if d.name != "attribute_head":
            shutil.rmtree(d)
    cfg = repo / "attribute_head" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace(str(tiny_checkpoint.resolve()), str(tmp_path / "missing-checkpoint")))
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log=lambda _l: None,
                          exit_timeout_s=2)
    with pytest.raises(ServerError, match=r"(?s)attribute_head.*missing-checkpoint.*does not exist"):
        server.start(timeout_s=120)
    assert server.proc.poll() is not None, "the failed server was left running"


def test_cli_repo_and_serve_errors(tiny_checkpoint, tmp_path, capsys):
    from runtime.cli import main

    out = tmp_path / "repo"
    assert main(["repo", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--max-batch", "2"]) == 0
    assert "facert serve --model-repository" in capsys.readouterr().out
    assert parse_config(out / "llm" / "config.pbtxt").max_batch_size == 2
    assert main(["repo", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert "--force replaces it" in capsys.readouterr().err
    assert main(["serve", "--model-repository", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_wheel_install_fills_a_repository_from_its_own_templates(tiny_checkpoint, tmp_path):
    """The templates are package data: `facert repo` works from a (non-editable) wheel, not only a checkout."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels)], capture_output=True, text=True, cwd=tmp_path)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("facert-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys; from pathlib import Path; from runtime.serving import repo; "
            f"assert Path(repo.__file__).is_relative_to({str(target)!r}), repo.__file__; "
            f"cfg = repo.fill_repository(Path({str(tmp_path / 'repo')!r}), checkpoint={str(tiny_checkpoint)!r}); "
            "print(sorted(cfg))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(target)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "faceinsight" in run.stdout and "llm" in run.stdout
    assert (tmp_path / "repo" / "llm" / "1" / "model.py").read_bytes() == (
        root / "model_repository" / "llm" / "1" / "model.py").read_bytes()


def _processes_naming(text: str, but: int) -> dict[int, str]:
    """pid -> command line of every live process whose command line holds `text`, but `but`'s."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == but:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (entry / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found[int(entry.name)] = cmdline
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_facert_serve_leaves_no_served_process_behind(tiny_checkpoint, tmp_path):
    """`facert serve` killed outright (SIGKILL: no cleanup of its own) takes its tritonserver, gateway and
    stubs with it (the kernel's parent-death signal), and its ports can be bound again."""
    import subprocess
    import time
    import urllib.request

    repo = tmp_path / "repo"
    fill_repository(repo, checkpoint=tiny_checkpoint)
    http, grpc, metrics = free_ports(3)
    serve = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(repo),
                              "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                              "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert serve.poll() is None and time.monotonic() < deadline, "facert serve did not become ready"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        children = _processes_naming(str(repo), but=serve.pid)
        assert any("tritonserver" in c for c in children.values()), children
        assert any("runtime.serving.gateway" in c for c in children.values()), children
        serve.kill()
        serve.wait()
        deadline = time.monotonic() + 60
        while _processes_naming(str(repo), but=serve.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _processes_naming(str(repo), but=serve.pid), "left running after facert serve was killed"
        for port in (http, grpc, metrics):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", port))
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in _processes_naming(str(repo), but=serve.pid):  # never leak them, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

"""`facert repo`, `facert serve` and `facert serve-demo`: registered into the facert command by runtime/cli.py.

  facert repo  --checkpoint DIR | --engines DIR --out DIR [--target portable|native]
  facert serve --model-repository DIR [--host 127.0.0.1] [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]
  facert serve-demo        the main job end to end: demo checkpoint -> onnxruntime engines -> repository
                           -> tritonserver -> one streamed question over gRPC -> stop

Native target, on a GPU host, inside NVIDIA's Triton + TensorRT-LLM container (it has TensorRT,
TensorRT-LLM and the tensorrtllm, onnxruntime and tensorrt backends; facert is installed into it
because the python steps import it, and the engines are built there for that GPU):

  docker run --rm -it --gpus all --shm-size=2g -p 127.0.0.1:8000-8002:8000-8002 \\
      -v $PWD:/work -w /work nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3 bash
  # in the container:
  pip install -e '.[serve]'
  facert build --checkpoint CKPT --backend tensorrt-llm --precision bf16 --out engines/NAME
  facert repo --engines engines/NAME --backend tensorrt-llm --target native --out repo-native
  facert serve --model-repository repo-native --host 0.0.0.0 --tritonserver /opt/tritonserver/bin/tritonserver
  # on the host:
  facert ask face.jpg "Is this person smiling?" --url 127.0.0.1:8001 --stream
"""

from __future__ import annotations

import sys
from pathlib import Path


def _progress(msg: str) -> None:
    print(f"[facert] {msg}", file=sys.stderr, flush=True)


def cmd_repo(args) -> int:
    from runtime.serving.repo import RepositoryError, fill_repository

    try:
        configs = fill_repository(args.out, checkpoint=args.checkpoint, engines=args.engines, backend=args.backend,
                                  target=args.target, device=args.device, max_batch_size=args.max_batch,
                                  max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
                                  overwrite=args.force, max_images=args.max_images)
    except RepositoryError as e:
        print(f"facert: error: {e}", file=sys.stderr)
        return 2
    ensemble = next(n for n, c in configs.items() if c.platform == "ensemble")
    print(f"wrote {args.out}: {len(configs)} models ({', '.join(sorted(configs))}); every config.pbtxt parses "
          f"as a Triton ModelConfig. Serve it with: facert serve --model-repository {args.out}  "
          f"(ensemble: {ensemble})")
    return 0


def cmd_serve(args) -> int:
    from runtime.serving.server import ServerError, TritonServer

    server = TritonServer(args.model_repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=args.log_verbose,
                          provision_log=_progress, log=None if not args.quiet else (lambda line: None),
                          tritonserver=args.tritonserver, recover=not args.no_recover, say=_progress)
    try:
        server.start(timeout_s=args.timeout)
    except ServerError as e:
        print(f"facert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        server.stop()
        return 130
    _progress(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url} "
              f"(Ctrl-C stops it)")
    _progress(f"ask it: facert ask IMAGE 'QUESTION' --url {server.grpc_url} --stream")
    return server.serve_forever()


def served_demo(out: str | Path, image: str | Path, question: str, params, use_engines: bool = True,
                host: str = "127.0.0.1", echo=print) -> int:
    """init the demo checkpoint, build onnxruntime engines, fill the repository, serve, ask over gRPC, stop."""
    from runtime.checkpoint import init_checkpoint
    from runtime.cli import print_answer
    from runtime.client import ask_remote, model_card
    from runtime.pipeline import Answer
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports, port_is_free

    out = Path(out)
    ckpt = out / "checkpoints" / "demo"
    if not (ckpt / "config.json").exists():
        init_checkpoint("demo", ckpt, progress=_progress)
    else:
        _progress(f"reusing {ckpt} (delete it to rebuild)")
    source = {"checkpoint": ckpt}
    if use_engines:
        engines = out / "engines" / "demo-onnxruntime"
        if not (engines / "manifest.json").exists():
            from export.build import build_engines

            _progress(f"building onnxruntime engines into {engines}")
            build_engines(str(ckpt), "onnxruntime", str(engines), force=True)
        else:
            _progress(f"reusing {engines} (delete it to rebuild)")
        source = {"engines": engines, "backend": "onnxruntime"}
    repo = out / "model_repository"
    fill_repository(repo, overwrite=True, **source)
    _progress(f"model repository {repo} ({'onnxruntime engines' if use_engines else 'torch checkpoint'})")

    ports = [8000, 8001, 8002]
    if not all(port_is_free(host, p) for p in ports):
        ports = free_ports(3, host)
    log_path = out / "tritonserver.log"
    with open(log_path, "w") as log_file:
        server = TritonServer(repo, host=host, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                              log=lambda line: print(line, file=log_file, flush=True), provision_log=_progress)
        _progress(f"starting tritonserver (log: {log_path})")
        with server:
            _progress(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}")
            echo(f"Q: {question}\n(image: {image}, asked over gRPC at {server.grpc_url}, streamed)\nA: ", end="")
            result = ask_remote(server.grpc_url, Path(image).read_bytes(), question, params, stream=True,
                                on_text=lambda piece: echo(piece, end="", flush=True))
            card = model_card(server.grpc_url, result["model"])
            answer = Answer(result["text"], result["token_ids"], result["finish_reason"] or "", result["timings"],
                            result["attributes"], result["attributes_raw"], result["constraints_fired"])
            print_answer(answer, card, streamed=True, out=sys.stdout)
            _progress("stopping tritonserver")
    return 0


def cmd_serve_demo(args) -> int:
    from runtime.client import RemoteError
    from runtime.generate import SamplingParams
    from runtime.serving.repo import RepositoryError
    from runtime.serving.server import ServerError

    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    try:
        return served_demo(args.out, args.image, args.question, params.validate(), use_engines=not args.no_engines)
    except (ServerError, RepositoryError, RemoteError, ValueError) as e:
        print(f"\nfacert: error: {e}", file=sys.stderr)
        return 2


def register(sub) -> None:
    from runtime.preprocess import MAX_IMAGES
    from runtime.serving.repo import DEFAULT_MAX_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT_MS, TARGETS

    p = sub.add_parser(
        "repo", help="fill a Triton model repository for a checkpoint or engines folder",
        description="Write the Triton model repository for one model: a folder per step (preprocessing, "
                    "vision encoder, face parser, seg projection, attribute head, LLM, postprocessing) and "
                    "the family's ensemble (faceinsight or facellm). Every config.pbtxt is checked against "
                    "Triton's ModelConfig schema. `portable` runs anywhere (python backend); `native` is for "
                    "NVIDIA's Triton containers (onnxruntime/tensorrt platforms, tensorrtllm backend).")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", help="checkpoint directory (portable target: torch components)")
    where.add_argument("--engines", help="engines folder built by `facert build`")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "tensorrt-llm"),
                   help="backend the --engines folder was built for (default onnxruntime)")
    p.add_argument("--out", required=True, help="repository directory to write")
    p.add_argument("--target", default="portable", choices=TARGETS, help="portable (default) or native")
    p.add_argument("--device", help="device for the python steps (default cpu; cuda for native)")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of every model (default 8)")
    p.add_argument("--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE,
                   help=f"requests a model may hold waiting; one more is refused at once as overloaded "
                        f"(default {DEFAULT_MAX_QUEUE_SIZE})")
    p.add_argument("--queue-timeout-ms", type=int, default=DEFAULT_QUEUE_TIMEOUT_MS,
                   help=f"a request waiting longer than this in a model's queue is refused, unless it carries its "
                        f"own timeout; 0: no default (default {DEFAULT_QUEUE_TIMEOUT_MS})")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES,
                   help=f"images one request may hold (default {MAX_IMAGES}); more are refused with an error naming the bound")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_repo)

    p = sub.add_parser(
        "serve", help="serve a model repository with Triton Inference Server",
        description="Run the Triton Inference Server that ships in the nvidia-pytriton wheel (unpacked into "
                    "tools/ on first use) on a model repository written by `facert repo`; waits until every "
                    "model is ready, forwards the server's log, and stops it cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("--model-repository", required=True, help="repository directory (facert repo --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load (default 300)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (default 0)")
    p.add_argument("--quiet", action="store_true", help="do not forward the server's log")
    p.add_argument("--tritonserver", help="an installed tritonserver binary to run instead of nvidia-pytriton's "
                                          "(NVIDIA's containers: /opt/tritonserver/bin/tritonserver)")
    p.add_argument("--no-recover", action="store_true",
                   help="do not reload a model whose python-backend process died (by default the server is "
                        "watched and such a model is reloaded)")
    p.set_defaults(func=cmd_serve)

    from runtime.cli import DEMO_IMAGE, DEMO_QUESTION, _add_sampling

    p = sub.add_parser(
        "serve-demo", help="the main job, served: demo model -> engines -> Triton -> streamed answer over gRPC",
        description="Build the demo checkpoint (once) and its onnxruntime engines (once), fill the model "
                    "repository, start tritonserver on 127.0.0.1, ask one question over gRPC with streaming, "
                    "print the answer, attributes and per-stage timings, and stop the server.")
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out/)")
    p.add_argument("--image", default=str(DEMO_IMAGE), help="image (default: the NASA astronaut photo)")
    p.add_argument("--question", default=DEMO_QUESTION, help="question to ask")
    p.add_argument("--no-engines", action="store_true", help="serve the torch checkpoint instead of onnxruntime engines")
    _add_sampling(p)
    p.set_defaults(func=cmd_serve_demo)


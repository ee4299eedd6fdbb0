"""`facert repo` and `facert serve`: the Triton model repository and the server.

  facert repo  --checkpoint DIR | --engines DIR --out DIR [--target portable|native]
  facert serve --model-repository DIR [--host 127.0.0.1] [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]
               [--openai-port 9000]    (+ an OpenAI-compatible chat endpoint: runtime/serving/openai_frontend.py)

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

from runtime.cli.common import err, progress


def cmd_repo(args) -> int:
    from runtime.serving.repo import RepositoryError, fill_repository

    try:
        configs = fill_repository(args.out, checkpoint=args.checkpoint, engines=args.engines, backend=args.backend,
                                  target=args.target, device=args.device, max_batch_size=args.max_batch,
                                  max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms,
                                  overwrite=args.force, max_images=args.max_images, scheduler=args.scheduler,
                                  kv_slots=args.kv_slots, slot_tokens=args.slot_tokens,
                                  prefill_chunk=args.prefill_chunk, prefix_cache_mb=args.prefix_cache_mb,
                                  encoder_cache_mb=args.encoder_cache_mb)
    except RepositoryError as e:
        return err(str(e))
    ensemble = next(n for n, c in configs.items() if c.platform == "ensemble")
    print(f"wrote {args.out}: {len(configs)} models ({', '.join(sorted(configs))}); every config.pbtxt parses "
          f"as a Triton ModelConfig. Serve it with: facert serve --model-repository {args.out}  "
          f"(ensemble: {ensemble})")
    return 0


def cmd_serve(args) -> int:
    from runtime.serving.server import ServerError, TritonServer
    server = TritonServer(args.model_repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_verbose=args.log_verbose,
                          provision_log=progress, log=None if not args.quiet else (lambda line: None),
                          tritonserver=args.tritonserver, recover=not args.no_recover, say=progress,
                          openai_port=args.openai_port, openai_max_body_mb=args.openai_max_body_mb)
    try:
        server.start(timeout_s=args.timeout)
    except ServerError as e:
        return err(str(e))
    except KeyboardInterrupt:
        server.stop()
        return 130
    progress(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url}, metrics {server.metrics_url}"
             + (f", OpenAI {server.openai_url}" if server.openai_url else "") + " (Ctrl-C stops it)")
    progress(f"ask it: facert ask IMAGE 'QUESTION' --url {server.grpc_url} --stream")
    return server.serve_forever()


def register(sub) -> None:
    from runtime.preprocess import MAX_IMAGES
    from runtime.serving.repo import (DEFAULT_ENCODER_CACHE_MB, DEFAULT_MAX_QUEUE_SIZE, DEFAULT_PREFILL_CHUNK,
                                      DEFAULT_PREFIX_CACHE_MB, DEFAULT_QUEUE_TIMEOUT_MS, DEFAULT_SLOT_TOKENS,
                                      SCHEDULERS, TARGETS)

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
    p.add_argument("--scheduler", default="inflight", choices=SCHEDULERS,
                   help="the llm step's scheduler: inflight (default: requests join and leave the running batch "
                        "at every token) or static (each batch runs to the end of its longest answer)")
    p.add_argument("--kv-slots", type=int, help="inflight: requests generating at once, each in its own KV-cache "
                                                "slot (default: --max-batch)")
    p.add_argument("--slot-tokens", type=int,
                   help=f"inflight: positions per KV-cache slot; prompt + max_tokens must fit (default "
                        f"{DEFAULT_SLOT_TOKENS}, or the model's context if shorter)")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"inflight: prompt tokens prefilled per iteration, the longest a running request waits "
                        f"between two tokens (default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB,
                   help=f"inflight: the prefix cache's bound (the KV rows of a prompt up to its image; a second "
                        f"question about the same image prefills only the question); 0 = off "
                        f"(default {DEFAULT_PREFIX_CACHE_MB})")
    p.add_argument("--encoder-cache-mb", type=float, default=DEFAULT_ENCODER_CACHE_MB,
                   help=f"each image step's cache of its outputs for image bytes it has seen; 0 = off "
                        f"(default {DEFAULT_ENCODER_CACHE_MB})")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_repo)

    p = sub.add_parser(
        "serve", help="serve a model repository with Triton Inference Server",
        description="Run the Triton Inference Server that ships in the nvidia-pytriton wheel (unpacked into "
                    "tools/ on first use) on a model repository written by `facert repo`; waits until every "
                    "model is ready, forwards the server's log, and stops it cleanly on Ctrl-C or SIGTERM.",
        epilog="onnxruntime engines: the served steps' workers sleep between ops (the steps share the cores); "
               "FACERT_ORT_SPIN=1 lets them spin, which decodes one stream at a time ~10% faster on cores that "
               "serve nothing else and loses under concurrent requests. FACERT_ORT_THREADS sets the intra-op "
               "threads.")
    p.add_argument("--model-repository", required=True, help="repository directory (facert repo --out)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--openai-port", type=int, default=None,
                   help="also serve an OpenAI-compatible chat endpoint (/v1/chat/completions, with images) on this "
                        "port, on --host, from the gateway in front of tritonserver (default: off)")
    p.add_argument("--openai-max-body-mb", type=float, default=None,
                   help="largest request body the OpenAI endpoint accepts, in MiB (default 64); a larger one is "
                        "refused with 413")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the models to load (default 300)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (default 0)")
    p.add_argument("--quiet", action="store_true", help="do not forward the server's log")
    p.add_argument("--tritonserver", help="an installed tritonserver binary to run instead of nvidia-pytriton's "
                                          "(NVIDIA's containers: /opt/tritonserver/bin/tritonserver)")
    p.add_argument("--no-recover", action="store_true",
                   help="do not reload a model whose python-backend process died (by default the server is "
                        "watched and such a model is reloaded)")
    p.set_defaults(func=cmd_serve)

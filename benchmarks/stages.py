"""Per-stage latency per backend, batch by batch, next to Hugging Face transformers on the same weights.

    .venv/bin/python benchmarks/stages.py [--work demo_out] [--batches 1,2,4] [--max-new-tokens 16] [--repeats 3]
    facert bench stages ...                    (the same, from the facert command)

One request (or a batch of B identical requests: same image, same question) through each stage:

  preprocess     prompt ids + image decode/resize/normalise (runtime.preprocess), for B images
  vision         vision tower + projector          parser      face parser (BiSeNet)
  seg            seg-token projection              attributes  attribute head + logical constraints
  prefill        the LLM over the spliced prompt (image + seg + text tokens)
  decode_token   one greedy decode step for the batch (per-token latency; tokens/s = B / that)
  postprocess    detokenisation of the answer + attribute dictionaries

Backends:
  onnxruntime            facert's ONNX Runtime engines (runtime.engines.open_pipeline)
  torch                  facert's torch backend (TorchComponents: StaticCache, runtime.generate)
  transformers           the peer: the same modules, the LLM run by `model.llm.generate` (eager,
                         DynamicCache), timed per token by a streamer; detokenised with batch_decode
  transformers-static    `generate(cache_implementation="static")`, not compiled
  transformers-compile   `generate(cache_implementation="static")` with torch.compile (CompileConfig,
                         compiled on CPU too); the warm-up that pays the compile is timed apart
The peer's vision/parser/seg/attribute stages run the same torch modules as `torch` (facert's torch
backend is those modules), so its ratios differ from torch's in the LLM stages only.

Every backend generates exactly --max-new-tokens tokens (EOS ignored), so decode rates cover the
same lengths; greedy tokens are compared with torch's. Backends take turns run by run (medians over
--repeats after a warm-up), so load from elsewhere on a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_cpu_backends import QUESTION  # noqa: E402
from benchmarks.report import STAGE_ORDER, md_table, new_record, results_dir, write_results  # noqa: E402
from runtime.generate import SamplingParams, generate  # noqa: E402
from runtime.models.attributes import CELEBA_ATTRIBUTES, apply_constraints  # noqa: E402
from runtime.pipeline import TextStream  # noqa: E402
from runtime.prompt import splice_prompt_table  # noqa: E402

FACERT_BACKENDS = ("onnxruntime", "torch")
PEERS = ("transformers", "transformers-static", "transformers-compile")


def _attribute_dicts(probs: torch.Tensor) -> list:
    fixed = apply_constraints(probs.float().cpu())
    return [(dict(zip(CELEBA_ATTRIBUTES, map(float, fixed.probs[i]))), fixed.fired[i]) for i in range(len(probs))]


def _before_llm(pipe, images: list[bytes], n: int, encode, parse, seg, attributes) -> tuple[dict, torch.Tensor, list]:
    """preprocess -> vision -> parser -> seg -> attributes for a batch; (seconds per stage, prompt table, ids)."""
    t = {}
    t0 = time.perf_counter()
    built = [pipe.requests.build(b, QUESTION, None, n) for b in images]  # one image (one tile) per request
    inputs, ids = [x for x, _ in built], [row for _, row in built]
    t["preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    image_tokens, pooled = encode(np.concatenate([x.pixel_values for x in inputs]))
    t["vision"] = time.perf_counter() - t0
    tables = [torch.as_tensor(image_tokens)]
    if pipe.c.num_seg_tokens:
        t0 = time.perf_counter()
        labels = parse(np.concatenate([x.parser_pixels for x in inputs]))
        t["parser"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tables.append(torch.as_tensor(seg(labels)))
        t["seg"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        _attribute_dicts(attributes(pooled))
        t["attributes"] = time.perf_counter() - t0
    return t, torch.cat(tables, dim=1), ids


def run_facert(pipe, images: list[bytes], n: int) -> dict:
    """One batch through a FacePipeline's components and runtime.generate; seconds per stage."""
    c = pipe.c
    t_start = time.perf_counter()
    t, table, ids = _before_llm(pipe, images, n, c.encode_image, c.parse_face, c.seg_tokens, c.attributes)
    embeds = splice_prompt_table(c.llm.embed, torch.tensor(ids), table.to(c.llm.device), c.vocab_size)
    first_token_at = []

    def on_token(i: int, _token: int) -> None:
        if not first_token_at:
            first_token_at.append(time.perf_counter())

    res = generate(c.llm, list(embeds), SamplingParams(max_new_tokens=n), eos_token_ids=(), on_token=on_token)
    t["prefill"] = res.prefill_s
    t["decode_token"] = res.decode_s / max(res.decode_steps, 1)
    t0 = time.perf_counter()
    for tokens in res.tokens:  # what the server's LLM step does per token, for every request
        stream = TextStream(pipe.tokenizer)
        for tok in tokens:
            stream.push(tok)
    t["postprocess"] = time.perf_counter() - t0
    end = time.perf_counter()
    return {**t, "ttft": first_token_at[0] - t_start, "end_to_end": end - t_start, "tokens": res.tokens,
            "prompt_tokens": len(ids[0])}


def _token_times():
    """A transformers streamer that notes when each step's tokens arrive (the first put is the prompt).
    Built on first use, so that importing this module does not import transformers."""
    from transformers.generation.streamers import BaseStreamer

    class TokenTimes(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return TokenTimes()


def _generate_kwargs(variant: str) -> dict:
    if variant == "transformers":
        return {}
    if variant == "transformers-static":
        return {"cache_implementation": "static", "disable_compile": True}
    if variant == "transformers-compile":
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers compiles only on GPUs unless told (its own flag)
        return {"cache_implementation": "static", "compile_config": config}
    raise ValueError(f"unknown peer {variant!r}; choose one of {PEERS}")


def run_transformers(pipe, images: list[bytes], n: int, variant: str = "transformers") -> dict:
    """The same batch with the LLM run by transformers' own `generate`; seconds per stage."""
    model = pipe.c.model
    llm = model.llm
    with torch.inference_mode():
        t_start = time.perf_counter()
        t, table, ids = _before_llm(pipe, images, n, lambda x: model.encode_image(torch.from_numpy(x)),
                                    lambda x: model.parse_face(torch.from_numpy(x)), model.seg, model.attributes)
        embeds = splice_prompt_table(llm.get_input_embeddings(), torch.tensor(ids), table, pipe.c.vocab_size)
        streamer = _token_times()
        t0 = time.perf_counter()
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                           do_sample=False, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None,
                           top_k=None, max_new_tokens=n, min_new_tokens=n, streamer=streamer,
                           **_generate_kwargs(variant))
        times = streamer.times
        t["prefill"] = times[0] - t0  # prompt forward + the first greedy pick
        t["decode_token"] = (times[-1] - times[0]) / max(len(times) - 1, 1)
        t0 = time.perf_counter()
        tokens = out[:, -n:].tolist()
        pipe.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        t["postprocess"] = time.perf_counter() - t0
        end = time.perf_counter()
    return {**t, "ttft": times[0] - t_start, "end_to_end": end - t_start, "tokens": tokens,
            "prompt_tokens": len(ids[0])}


def _median_ms(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs) * 1e3, 3)


def measure(runners: dict[str, Callable[[int], dict]], n: int, repeats: int,
            warmup_tokens: dict[str, int] | None = None,
            log: Callable[[str], None] = lambda m: None) -> dict[str, dict]:
    """Medians (ms) per backend of runner(n): a warm-up each, then `repeats` rounds in which every
    backend runs once. The warm-up is short (2 tokens: the prefill shape and the decode step,
    without the full decode) unless `warmup_tokens` names a length for that backend."""
    warm = {}
    for name, fn in runners.items():
        t0 = time.perf_counter()
        fn((warmup_tokens or {}).get(name, 2))
        warm[name] = time.perf_counter() - t0
    runs: dict[str, list] = {name: [] for name in runners}
    for i in range(repeats):
        for name, fn in runners.items():
            runs[name].append(fn(n))
        log(f"round {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]['end_to_end']:.2f} s" for k, v in runs.items()))
    out = {}
    for name, rs in runs.items():
        keys = [k for k in (*STAGE_ORDER, "ttft", "end_to_end") if k in rs[0]]
        out[name] = {k: _median_ms(rs, k) for k in keys}
        out[name]["tokens"] = rs[-1]["tokens"]
        out[name]["prompt_tokens"] = rs[-1]["prompt_tokens"]
        out[name]["warmup_s"] = round(warm[name], 2)
        out[name]["end_to_end_runs_ms"] = [round(r["end_to_end"] * 1e3, 1) for r in rs]
    return out


def to_rows(batch: int, n: int, measured: dict[str, dict], reference: str = "torch") -> tuple[list, list]:
    """(stage rows, end-to-end rows) for one batch size."""
    stages, requests = [], []
    ref_tokens = measured.get(reference, {}).get("tokens")
    for backend, m in measured.items():
        for stage in STAGE_ORDER:
            if stage in m:
                stages.append({"backend": backend, "batch": batch, "stage": stage, "ms": m[stage],
                               "ms_per_request": round(m[stage] / batch, 3)})
        requests.append({
            "backend": backend, "batch": batch, "new_tokens": n, "prompt_tokens": m["prompt_tokens"],
            "ttft_ms": m["ttft"], "itl_ms": m["decode_token"],
            "decode_tokens_per_s": round(batch * 1e3 / m["decode_token"], 2),
            "end_to_end_ms": m["end_to_end"],
            "requests_per_s": round(batch * 1e3 / m["end_to_end"], 3),
            "output_tokens_per_s": round(batch * n * 1e3 / m["end_to_end"], 2),
            "same_tokens_as_torch": None if ref_tokens is None else m["tokens"] == ref_tokens,
            # max/min of the rounds' end-to-end times: near 1 when nothing else disturbed the measurement
            "spread": round(max(m["end_to_end_runs_ms"]) / min(m["end_to_end_runs_ms"]), 2),
            "warmup_s": m["warmup_s"], "end_to_end_runs_ms": " ".join(map(str, m["end_to_end_runs_ms"])),
        })
    return stages, requests


def peer_error(variant: str, pipe, image: bytes, n: int) -> str | None:
    """None if `variant` runs here (one batch-1 request of n tokens); else its error, as recorded text."""
    try:
        run_transformers(pipe, [image], n, variant)
        return None
    except Exception as e:  # noqa: BLE001 (recorded in the results, not hidden)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def run_stages(ort_pipe, torch_pipe, image: bytes, batches: list[int], n: int, repeats: int,
               peers: tuple[str, ...] = ("transformers",), peer_batches: dict[str, list[int]] | None = None,
               max_spread: float | None = None, max_attempts: int = 1, retry_until: float | None = None,
               stop_at: float | None = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """Stage and end-to-end rows for every batch; peers beyond the first may be limited to some batches.

    On a shared machine another process can stall some rounds. With `max_spread`, a batch whose
    rounds disagree by more than that (max/min end-to-end time of any backend) is measured again,
    up to `max_attempts` in all and while time.perf_counter() < `retry_until`; the attempt whose
    rounds agree best is kept and its row says how many attempts there were.
    With `stop_at` (a time.perf_counter() deadline), a batch is skipped when the last one's time,
    scaled by the batch ratio, would run past it.

    Returns {"stages": rows, "requests": rows, "peer_errors": {variant: message},
    "peer_first_call_s": {variant: seconds of its first request (for compile: the compile)},
    "skipped_batches": [batch sizes left out for time]}.
    """
    peer_batches = peer_batches or {}
    stage_rows, request_rows, errors, first_call = [], [], {}, {}
    for variant in peers:
        if variant != "transformers":
            log(f"trying {variant} (one request; compiling may take a minute)")
            t0 = time.perf_counter()
            err = peer_error(variant, torch_pipe, image, n)
            if err:
                errors[variant] = err
                log(f"{variant} does not run here: {err}")
            else:
                first_call[variant] = round(time.perf_counter() - t0, 2)
                log(f"{variant}: first call {first_call[variant]} s")
    skipped, last = [], None  # last: (batch, seconds it took)
    for b in batches:
        if stop_at is not None:
            expected = 0.0 if last is None else last[1] * b / last[0]
            if time.perf_counter() + expected > stop_at:
                log(f"batch {b}: skipped, it would not finish in time (about {expected:.0f} s)")
                skipped.append(b)
                continue
        t_batch = time.perf_counter()
        images = [image] * b
        runners: dict[str, Callable[[int], dict]] = {}
        if ort_pipe is not None:
            runners["onnxruntime"] = lambda k: run_facert(ort_pipe, images, k)
        runners["torch"] = lambda k: run_facert(torch_pipe, images, k)
        for variant in peers:
            if variant in errors or b not in peer_batches.get(variant, batches):
                continue
            runners[variant] = lambda k, v=variant: run_transformers(torch_pipe, images, k, v)
        log(f"batch {b}: {', '.join(runners)}")
        best, attempts = None, 0
        while True:
            # a compiled static cache is shaped by prompt + new tokens: warm it up at the measured length
            measured = measure(runners, n, repeats, warmup_tokens={"transformers-compile": n}, log=log)
            attempts += 1
            worst = max(max(m["end_to_end_runs_ms"]) / min(m["end_to_end_runs_ms"]) for m in measured.values())
            if best is None or worst < best[0]:
                best = (worst, measured)
            if (max_spread is None or worst <= max_spread or attempts >= max_attempts
                    or (retry_until is not None and time.perf_counter() >= retry_until)):
                break
            log(f"batch {b}: the rounds disagree (max/min {worst:.2f} > {max_spread}): measuring it again")
        s, r = to_rows(b, n, best[1])
        for row in r:
            row["attempts"] = attempts
        stage_rows += s
        request_rows += r
        last = (b, (time.perf_counter() - t_batch) / attempts)
    return {"stages": stage_rows, "requests": request_rows, "peer_errors": errors, "peer_first_call_s": first_call,
            "skipped_batches": skipped}


def ensure_model(work: Path, spec: str = "demo", log: Callable[[str], None] = lambda m: None) -> tuple[Path, Path]:
    """(checkpoint, onnxruntime engines) of `spec` under `work`, built there once and reused after
    (the paths bench_cpu_backends.py and `facert serve-demo` use for the demo model)."""
    from export.build import Progress, build_engines
    from runtime.checkpoint import init_checkpoint

    ckpt = work / "checkpoints" / spec
    if not (ckpt / "config.json").exists():
        log(f"building the {spec} checkpoint in {ckpt}")
        init_checkpoint(spec, ckpt, progress=lambda *a: None)
    engines = work / "engines" / f"{spec}-onnxruntime"
    if not (engines / "manifest.json").exists():
        log(f"building onnxruntime engines in {engines}")
        build_engines(ckpt, "onnxruntime", engines, force=True, progress=Progress(8, quiet=True))
    return ckpt, engines


def open_pipelines(ckpt: Path, engines: Path | None, threads: int):
    """(onnxruntime pipeline or None, torch pipeline) over one model."""
    from runtime.engines import open_pipeline
    from runtime.pipeline import FacePipeline

    torch.set_num_threads(threads)
    ort_pipe = open_pipeline(engines, intra_op_threads=threads) if engines is not None else None
    return ort_pipe, FacePipeline.from_checkpoint(ckpt)


def stage_markdown(stages: list[dict], requests: list[dict], batch: int = 1, peer: str = "transformers") -> str:
    """The stage table and the end-to-end table at one batch size, each backend with its ratio to the peer."""
    backends = list(dict.fromkeys(r["backend"] for r in requests if r["batch"] == batch))
    cell = {(r["backend"], r["stage"]): r["ms"] for r in stages if r["batch"] == batch}
    header = ["stage (ms, batch %d)" % batch] + backends
    if peer in backends:
        header += [f"{b} speedup vs {peer}" for b in backends if b in FACERT_BACKENDS]
    rows = []
    for stage in STAGE_ORDER:
        if not any((b, stage) in cell for b in backends):
            continue
        row = [stage] + [cell.get((b, stage)) for b in backends]
        if peer in backends:
            row += [_ratio(cell.get((peer, stage)), cell.get((b, stage))) for b in backends if b in FACERT_BACKENDS]
        rows.append(row)
    e2e = {r["backend"]: r for r in requests if r["batch"] == batch}
    ref = e2e.get(peer)
    rows2 = []
    for b in backends:
        r = e2e[b]
        rows2.append([b, r["ttft_ms"], r["itl_ms"], r["decode_tokens_per_s"], r["end_to_end_ms"],
                      _ratio(ref["end_to_end_ms"], r["end_to_end_ms"]) if ref else None, f"{r['spread']:.2f}",
                      "yes" if r["same_tokens_as_torch"] else ("NO" if r["same_tokens_as_torch"] is False else "–")])
    return (md_table(header, rows) + "\n\n"
            + md_table([f"backend (batch {batch})", "TTFT ms", "per-token ms", "decode tokens/s", "end-to-end ms",
                        f"speedup vs {peer}", "spread (max/min of rounds)", "same tokens as torch"], rows2,
                       align="lrrrrrrl"))


def _ratio(num, den) -> str | None:
    if not num or not den:
        return None
    return f"{num / den:.2f}x"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    import os

    ap.add_argument("--work", default=str(ROOT / "demo_out"),
                    help="where the demo checkpoint and onnxruntime engines live (built there if missing)")
    ap.add_argument("--spec", default="demo", help="model spec (default demo; tiny for a quick smoke run)")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes (default 1,2,4)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer, EOS ignored (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up (default 3)")
    ap.add_argument("--peers", default="transformers,transformers-static",
                    help=f"transformers variants, comma-separated, from {','.join(PEERS)} "
                         "(default transformers,transformers-static)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime intra-op threads")
    ap.add_argument("--shared", default="", help="a note on other load on the machine, recorded as is")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-cpu-stages-<machine id>)")


def parse_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{what} must be positive integers, got {text!r}")
    return values


def run(args) -> int:
    from runtime.cli import DEMO_IMAGE

    batches = parse_list(args.batches, "--batches")
    peers = tuple(p for p in args.peers.split(",") if p)
    for p in peers:
        _generate_kwargs(p)  # an unknown name fails here, before anything loads
    log = lambda m: print(f"[bench stages] {m}", file=sys.stderr, flush=True)  # noqa: E731
    ckpt, engines = ensure_model(Path(args.work), args.spec, log=log)
    ort_pipe, torch_pipe = open_pipelines(ckpt, engines, args.threads)
    record = new_record("stages", shared=args.shared,
                        settings={"batches": batches, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                                  "threads": args.threads, "question": QUESTION, "image": DEMO_IMAGE.name,
                                  "spec": args.spec})
    res = run_stages(ort_pipe, torch_pipe, DEMO_IMAGE.read_bytes(), batches, args.max_new_tokens, args.repeats,
                     peers=peers, log=log)
    del ort_pipe, torch_pipe
    gc.collect()
    record["peer_errors"], record["peer_first_call_s"] = res["peer_errors"], res["peer_first_call_s"]
    md = f"# Per-stage latency — {record['date'][:10]}\n\n" + stage_markdown(res["stages"], res["requests"]) + "\n"
    out = Path(args.out) if args.out else results_dir("cpu-stages")
    write_results(out, record, {"stages": res["stages"], "requests": res["requests"]}, markdown=md)
    print(md)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp as a benchmark peer: a worker that bench_quant.py runs in llama-cpp-python's own venv.

    VENV/bin/python benchmarks/llama_cpp_peer.py --model FILE.gguf --threads 2

Standalone (llama_cpp and numpy only, no facert imports): it prints one JSON line describing itself,
then answers each JSON line {"tokens": [prompt ids], "n": new tokens} on stdin with one JSON line
{"prefill_ms", "decode_tokens_per_s", "end_to_end_ms", "tokens"}: a fresh context, the prompt
evaluated in one batch, then n greedy tokens one at a time (end-of-text ignored, so every run
decodes the same count), timed like facert's runners.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-ctx", type=int, default=1024)
    args = ap.parse_args()

    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_batch=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:
        # greedy from the last evaluated position's logits (without logits_all, Llama.scores is not filled)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "system_info":
                      llama_cpp.llama_print_system_info().decode(errors="replace").strip()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prompt, n = request["tokens"], int(request["n"])
        t_start = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        prefill = time.perf_counter() - t_start
        tokens = [next_token()]
        t0 = time.perf_counter()
        while len(tokens) < n:
            llm.eval([tokens[-1]])
            tokens.append(next_token())
        decode = time.perf_counter() - t0
        total = time.perf_counter() - t_start
        print(json.dumps({"prefill_ms": round(prefill * 1e3, 2), "decode_tokens_per_s": (n - 1) / decode,
                          "end_to_end_ms": round(total * 1e3, 2), "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

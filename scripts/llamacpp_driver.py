"""llama.cpp's side of the side-by-side scripts, run with .venv-llamacpp's Python.

Why one file: `bench-vs-llamacpp` and `logits-vs-llamacpp` must feed
llama.cpp exactly what they feed potluck (the same token ids, thread
counts and lengths), so the llama.cpp calls live in one place.

    round MODEL THREADS PROMPT DECODE   one JSON line: prompt and decode tok/s
    ttft MODEL THREADS                  first token of a 1-token prompt, then exit
    logits MODEL THREADS IDS OUT        all positions' logits as little-endian f32
"""
import json
import sys
import time

_IMPORT_START = time.perf_counter()
from llama_cpp import Llama  # noqa: E402

IMPORT_S = time.perf_counter() - _IMPORT_START


def token(i, vocab):
    """potluck bench's deterministic token ids."""
    return (i * 7919 + 13) % vocab


def load(model, threads, ctx, **kw):
    return Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=ctx,
                 n_batch=512, verbose=False, **kw)


def rate_round(model, threads, prompt_tokens, decode_tokens):
    """Wall-clock rates and rates per second of on-CPU time of all threads
    (time.process_time), as potluck's bench reports them. Decode runs after a
    16-token prompt, with the same ids as `potluck bench engine`."""
    llm = load(model, threads, max(1024, prompt_tokens + 16))
    vocab = llm.n_vocab()
    out = {}
    if prompt_tokens > 0:
        llm.reset()
        t, c = time.perf_counter(), time.process_time()
        llm.eval([token(i, vocab) for i in range(prompt_tokens)])
        out["prompt_tok_s"] = prompt_tokens / (time.perf_counter() - t)
        out["prompt_tok_per_cpu_s"] = prompt_tokens / (time.process_time() - c)
    llm.reset()
    llm.eval([token(i, vocab) for i in range(16)])
    t, c = time.perf_counter(), time.process_time()
    for step in range(decode_tokens):
        llm.eval([token(step * 31, vocab)])
    out["decode_tok_s"] = decode_tokens / (time.perf_counter() - t)
    out["decode_tok_per_cpu_s"] = decode_tokens / (time.process_time() - c)
    print(json.dumps(out))


def ttft(model, threads):
    """Loads the model, evaluates one prompt token and writes the greedy next
    token's id to stdout at once (the caller times the first byte); stderr
    gets how long the Python import took, which is not llama.cpp's cost."""
    llm = load(model, threads, 512)
    llm.eval([llm.token_bos()])
    import numpy as np
    best = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    sys.stdout.write(f"{best}\n")
    sys.stdout.flush()
    sys.stderr.write(json.dumps({"import_s": IMPORT_S}) + "\n")


def logits(model, threads, ids, out):
    """Every position's logits of one sequence (`logits_all`)."""
    ids = [int(t) for t in ids.split(",")]
    llm = load(model, threads, max(512, len(ids)), logits_all=True)
    llm.eval(ids)
    import numpy as np
    np.asarray(llm.scores[: len(ids)], dtype="<f4").tofile(out)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "round":
        rate_round(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif cmd == "ttft":
        ttft(args[0], int(args[1]))
    elif cmd == "logits":
        logits(args[0], int(args[1]), args[2], args[3])
    else:
        sys.exit(f"unknown command {cmd}")

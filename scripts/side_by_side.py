"""The table and time-to-first-token modes of scripts/bench-vs-llamacpp.

Why a separate file: these modes loop over files and rounds and summarise
medians with their spread, which reads better in Python than in bash. Each
measurement is a fresh process (potluck's `bench engine` or `generate`, or
llamacpp_driver.py), so one engine's warm state never helps the other, and
the two alternate within every round, so a change in the host's load hits
both.

    table  POTLUCK PY ROUNDS THREADS DECODE FILE...
    ttft   POTLUCK PY ROUNDS THREADS FILE
"""
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "llamacpp_driver.py")


def run_json(cmd):
    """Runs `cmd`, returns its last stdout line as JSON; stderr shown on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def spread(values):
    """`median (min–max)`, the form every figure takes in the table."""
    return statistics.median(values), min(values), max(values)


def fmt(s, digits=2):
    med, lo, hi = s
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def commit():
    r = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", HERE, "diff", "--quiet", "HEAD", "--", "engine", "src"]).returncode
    return r.stdout.strip() + ("+dirty" if dirty else "")


def header(potluck, py, threads, rounds):
    llama = subprocess.run([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                           text=True).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{now}; potluck {commit()} ({potluck}); llama-cpp-python {llama}; "
          f"{threads} threads; {rounds} alternating rounds; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")


def table(potluck, py, rounds, threads, decode, files):
    rows, decode_of = {}, {}
    for f in files:
        rows[f] = []
        # 0: 16 tokens for files over 1 GiB (7B shape), 128 below (see bench-vs-llamacpp).
        decode_of[f] = decode or (16 if os.path.getsize(f) > (1 << 30) else 128)
        for r in range(rounds):
            print(f"{os.path.basename(f)} round {r + 1}/{rounds}...", file=sys.stderr)
            n = str(decode_of[f])
            engine = [potluck, "bench", "engine", "--model", f, "--runs", "1", "--decode-tokens", n, "--json"]
            p = run_json(engine + ["--threads", str(threads), "--prompt-tokens", "512", "--batches", "1,16"])
            l = run_json([py, DRIVER, "round", f, str(threads), "512", n])
            # One thread: decode only matters; a 16-token prompt keeps the round short.
            p1 = run_json(engine + ["--threads", "1", "--prompt-tokens", "16", "--batches", "1"])
            l1 = run_json([py, DRIVER, "round", f, "1", "0", n])
            rows[f].append({"p": p, "l": l, "p1": p1, "l1": l1})
            print(json.dumps({"file": f, "round": r + 1, **rows[f][-1]}), file=sys.stderr)
    header(potluck, py, threads, rounds)
    print("decode: " + ", ".join(f"{os.path.basename(f)} {n}" for f, n in decode_of.items())
          + " tokens per round after a 16-token prompt; prompt: 512 tokens; tok/s, median (min–max); "
          "ratio = potluck median / llama.cpp median\n")
    print("| file | figure | potluck | llama.cpp | ratio |")
    print("|---|---|---|---|---|")
    summary = []
    for f, rs in rows.items():
        name = os.path.basename(f)
        get = lambda side, key: spread([r[side][key] for r in rs])
        b1, lb1 = get("p", "decode_tok_s"), get("l", "decode_tok_s")
        pr, lpr = get("p", "prompt_tok_s"), get("l", "prompt_tok_s")
        b16 = get("p", "decode_batch16_tok_s")
        t1, lt1 = get("p1", "decode_tok_s"), get("l1", "decode_tok_s")
        print(f"| {name} | decode batch 1 | {fmt(b1)} | {fmt(lb1)} | {b1[0] / lb1[0]:.2f}× |")
        print(f"| | prompt (512) | {fmt(pr)} | {fmt(lpr)} | {pr[0] / lpr[0]:.2f}× |")
        print(f"| | decode batch 16 | {fmt(b16)} | | {b16[0] / b1[0]:.2f}× batch 1 |")
        print(f"| | decode, 1 thread | {fmt(t1)} | {fmt(lt1)} | {t1[0] / lt1[0]:.2f}× |")
        summary.append({"file": f, "decode_tokens": decode_of[f], "decode_ratio": b1[0] / lb1[0], "prompt_ratio": pr[0] / lpr[0],
                        "batch16_over_batch1": b16[0] / b1[0], "one_thread_decode_ratio": t1[0] / lt1[0],
                        "rounds": rs})
    print(json.dumps({"mode": "table", "threads": threads, "files": summary}))


def timed(cmd):
    """Seconds from spawn to the first byte on stdout (or to exit, if it
    prints nothing), and peak RSS in MiB from `/usr/bin/time -v`."""
    rss_file = f"/tmp/side_by_side_rss_{os.getpid()}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", rss_file] + cmd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    _, err = proc.communicate()
    t_exit = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode(errors='replace')[-3000:]}")
    report = open(rss_file).read()
    os.unlink(rss_file)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report).group(1))
    return (t_first if first else t_exit), t_exit, rss_kb / 1024, err.decode(errors="replace")


def ttft(potluck, py, rounds, threads, f):
    size_mib = os.path.getsize(f) / (1 << 20)
    # Warm the page cache for both: the figure is load and first token, not disk.
    with open(f, "rb") as fh:
        while fh.read(1 << 24):
            pass
    p_cmd = [potluck, "generate", "--model", f, "--prompt", "Hello", "--max-tokens", "1", "--temperature", "0",
             "--threads", str(threads)]
    l_cmd = [py, DRIVER, "ttft", f, str(threads)]
    rs = []
    for r in range(rounds):
        print(f"ttft round {r + 1}/{rounds}...", file=sys.stderr)
        p_first, p_exit, p_rss, _ = timed(p_cmd)
        l_first, l_exit, l_rss, l_err = timed(l_cmd)
        imp = json.loads(l_err.strip().splitlines()[-1])["import_s"]
        rs.append({"potluck": [p_first, p_exit, p_rss], "llamacpp": [l_first, l_exit, l_rss], "import_s": imp})
        print(json.dumps(rs[-1]), file=sys.stderr)
    header(potluck, py, threads, rounds)
    get = lambda side, i: spread([r[side][i] for r in rs])
    pf, lf = get("potluck", 0), get("llamacpp", 0)
    lf_net = spread([r["llamacpp"][0] - r["import_s"] for r in rs])
    pr, lr = get("potluck", 2), get("llamacpp", 2)
    print(f"{os.path.basename(f)} ({size_mib:.0f} MiB), page cache warm for both; seconds from process start "
          "to the first token on stdout; peak RSS from /usr/bin/time -v\n")
    print("| figure | potluck | llama.cpp | ratio |")
    print("|---|---|---|---|")
    print(f"| first token, s | {fmt(pf)} | {fmt(lf)} | {pf[0] / lf[0]:.2f}× |")
    print(f"| first token less Python's import, s | {fmt(pf)} | {fmt(lf_net)} | {pf[0] / lf_net[0]:.2f}× |")
    print(f"| peak RSS, MiB | {fmt(pr, 0)} | {fmt(lr, 0)} | {pr[0] / lr[0]:.2f}× |")
    print(f"| peak RSS / file size | {pr[0] / size_mib:.2f} | {lr[0] / size_mib:.2f} | |")
    print(json.dumps({"mode": "ttft", "file": f, "file_mib": size_mib, "rounds": rs}))


if __name__ == "__main__":
    cmd, a = sys.argv[1], sys.argv[2:]
    if cmd == "table":
        table(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5:])
    elif cmd == "ttft":
        ttft(a[0], a[1], int(a[2]), int(a[3]), a[4])
    else:
        sys.exit(f"unknown command {cmd}")

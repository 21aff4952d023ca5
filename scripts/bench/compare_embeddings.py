#!/usr/bin/env python3
"""Side-by-side speed of `attn embed` and sentence-transformers (PyTorch) on all-MiniLM-L6-v2.

Same model folder, same sentences (fixtures/embed_bench_sentences.txt: 298 English sentences of
mixed length, 4 to 256 word pieces, written for this benchmark), same batch size (32), same
thread count (2), in the same run; the two engines alternate round by round, ABBA order (so
neither always runs first on a warm or cold machine), after one warm-up each.

    ~/.venvs/torch/bin/python scripts/bench/compare_embeddings.py            # 5 rounds
    ~/.venvs/torch/bin/python scripts/bench/compare_embeddings.py --rounds 9 --attn target/release/attn
    ~/.venvs/torch/bin/python scripts/bench/compare_embeddings.py --wait-idle 0.3 --wait-max 30
    ~/.venvs/torch/bin/python scripts/bench/compare_embeddings.py --equal-length 64   # equal-length batches

With --equal-length N the sentences are rewritten so that every one is exactly N word pieces
([CLS] and [SEP] included): the fixture's sentences are joined end to end, cut into N - 2 word
pieces each, decoded back to text, and kept when they re-tokenize to exactly N (--count of them,
default 256). Then no engine pads or skips padding: the ratio is the kernels' alone.

What is measured:
  sentence-transformers  `model.encode(sentences, batch_size=32, normalize_embeddings=True)` in
                         this process, torch.set_num_threads(2); tokenization included (it sorts
                         the sentences by length and pads each batch to its longest).
  attn                   `attn embed -m MODEL --file SENTENCES --threads 2 --batch-size 32
                         --timing --json`: its --timing line measures the embedding call only
                         (tokenization included; process start and model loading excluded); the
                         script also records the whole process's wall time (start, load, embed,
                         JSON output).
sentences/s = sentences / seconds. The summary gives the best and the median round of each and
the ratios attn / sentence-transformers. Every attn round's embeddings are checked against
sentence-transformers' (cosine >= 0.999 per sentence; the minimum is reported). CPU time used
by other processes during each round is recorded (/proc/stat minus the measured process's own
CPU time): on a shared machine that is what makes the numbers move.

Writes scripts/bench/results/minilm-embed-b32-t2-DATE.json (or --out).
Needs torch and sentence-transformers (never a dependency of attn); attn is built with
`cargo build --release -p attn-cli` unless --attn is given.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HZ = os.sysconf("SC_CLK_TCK")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def log(msg):
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def default_model():
    home = os.environ.get("ATTN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "attn")
    return os.path.join(home, "models", "all-minilm-l6-v2")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    return [x for x in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16") if x in fl]
    except OSError:
        pass
    return []


def busy_jiffies():
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle


def other_load_now(seconds=1.0):
    """Cores' worth of CPU used by everything on the machine over a short window."""
    b0 = busy_jiffies()
    time.sleep(seconds)
    return (busy_jiffies() - b0) / HZ / seconds


def wait_for_idle(threshold, max_wait):
    """Wait (at most max_wait s) until the machine uses less than `threshold` cores."""
    t0 = time.time()
    load = other_load_now()
    while load >= threshold and time.time() - t0 < max_wait:
        log(f"machine busy ({load:.2f} cores in use), waiting ...")
        time.sleep(4)
        load = other_load_now()
    return load


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_sentences(path):
    # as `attn embed --file` reads them: lines, blank ones skipped
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def equal_length_sentences(tokenizer, sentences, n, count):
    """`count` texts of exactly `n` word pieces each (special tokens included), cut from `sentences`."""
    pieces = []
    for s in sentences:
        pieces.extend(tokenizer.tokenize(s))
    out, i = [], 0
    while len(out) < count:
        if i + n - 2 > len(pieces):
            i = (i % 7) + 1  # wrap around at another offset: new cuts, same text
        text = tokenizer.convert_tokens_to_string(pieces[i:i + n - 2])
        i += n - 2
        if len(tokenizer(text)["input_ids"]) == n:
            out.append(text)
    return out


def cosine_check(a, b):
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min()), float(np.abs(a - b).max())


def run_st(model, sentences, a):
    cpu0, b0 = self_cpu(), busy_jiffies()
    t0 = time.perf_counter()
    emb = model.encode(sentences, batch_size=a.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    s = time.perf_counter() - t0
    cpu = self_cpu() - cpu0
    other = max(0.0, ((busy_jiffies() - b0) / HZ - cpu) / s)
    return {"engine": "sentence-transformers", "seconds": s, "sentences_per_s": len(sentences) / s,
            "cpu_seconds": cpu, "sentences_per_cpu_s": len(sentences) / cpu, "other_cores": other}, emb


def run_attn(a, n):
    cmd = [a.attn, "embed", "-m", a.model, "--file", a.sentences, "--threads", str(a.threads),
           "--batch-size", str(a.batch_size), "--timing", "--json"] + (["--int8"] if a.int8 else []) + (["--f32"] if a.f32 else [])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        b0 = busy_jiffies()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        b1 = busy_jiffies()
        rc = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode("utf-8", "replace")
    if rc != 0:
        raise RuntimeError(f"attn embed exited {rc}:\n{stderr[-2000:]}")
    # "[298 sentences in 2.520 s: 118.3 sentences/s]"
    line = [ln for ln in stderr.splitlines() if "sentences/s]" in ln][-1]
    got_n, secs = int(line.split()[0].lstrip("[")), float(line.split(" in ")[1].split()[0])
    assert got_n == n, (got_n, n)
    child_cpu = ru.ru_utime + ru.ru_stime
    # the embedding's CPU time: the process's minus that of a run embedding one word (start, load, exit)
    cpu = child_cpu - a.attn_overhead_cpu if a.attn_overhead_cpu is not None else None
    other = max(0.0, ((b1 - b0) / HZ - child_cpu) / wall)
    emb = [d["embedding"] for d in json.loads(stdout)["data"]]
    return {"engine": "attn", "seconds": secs, "sentences_per_s": n / secs, "cpu_seconds": cpu,
            "sentences_per_cpu_s": n / cpu if cpu else None, "process_wall_s": wall,
            "process_sentences_per_s": n / wall, "peak_rss_mib": ru.ru_maxrss / 1024,
            "other_cores": other}, emb


def attn_overhead_cpu(a):
    """CPU seconds of `attn embed` on one word (process start, model load, exit), median of 3."""
    v = []
    for _ in range(3):
        p = subprocess.Popen([a.attn, "embed", "-m", a.model, "--threads", str(a.threads), "--json", "x"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return None
        v.append(ru.ru_utime + ru.ru_stime)
    return statistics.median(v)


def git_commit():
    try:
        c = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=default_model(), help="HF folder of all-MiniLM-L6-v2")
    ap.add_argument("--sentences", default=os.path.join(REPO, "fixtures", "embed_bench_sentences.txt"))
    ap.add_argument("--attn", help="attn binary (default: build with cargo and use target/release/attn)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wait-idle", type=float, metavar="CORES",
                    help="before each round, wait until the machine uses less than CORES cores")
    ap.add_argument("--wait-max", type=float, default=60, help="longest wait for --wait-idle, seconds")
    ap.add_argument("--equal-length", type=int, metavar="N",
                    help="rewrite the sentences to exactly N word pieces each (equal-length batches)")
    ap.add_argument("--count", type=int, default=256, help="sentences for --equal-length")
    ap.add_argument("--int8", action="store_true", help="run `attn embed --int8` (8-bit weights and activations)")
    ap.add_argument("--f32", action="store_true",
                    help="run `attn embed --f32` (float32 matmuls even where the CPU has AMX bf16)")
    ap.add_argument("--out", help="result JSON (default scripts/bench/results/minilm-embed-b32-t2-DATE.json)")
    a = ap.parse_args()

    if not a.attn:
        log("building attn (cargo build --release -p attn-cli)")
        subprocess.run(["cargo", "build", "--release", "-p", "attn-cli"], cwd=REPO, check=True)
        target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(REPO, "target")
        a.attn = os.path.join(target, "release", "attn")
    sentences = read_sentences(a.sentences)
    source = os.path.relpath(a.sentences, REPO)

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the fast tokenizer's own threads: off
    import numpy as np
    import torch
    from importlib.metadata import version
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    st = SentenceTransformer(a.model, device="cpu")
    st.eval()
    tmp = None
    if a.equal_length:
        sentences = equal_length_sentences(st.tokenizer, sentences, a.equal_length, a.count)
        tmp = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
        tmp.write("\n".join(sentences) + "\n")
        tmp.close()
        a.sentences = tmp.name
    n = len(sentences)
    tok = st.tokenizer(sentences, truncation=True, max_length=st.max_seq_length)["input_ids"]
    lens = [len(t) for t in tok]
    log(f"{n} sentences, {sum(lens)} word pieces (min {min(lens)}, median {int(np.median(lens))}, "
        f"max {max(lens)}); torch threads {torch.get_num_threads()}")

    a.attn_overhead_cpu = attn_overhead_cpu(a)
    log(f"attn start + load + exit: {a.attn_overhead_cpu} CPU seconds (subtracted from its rounds' CPU time)")
    log("warm-up")
    _, st_emb = run_st(st, sentences, a)
    _, attn_emb = run_attn(a, n)
    min_cos, max_diff = cosine_check(st_emb, attn_emb)
    log(f"agreement: min cosine {min_cos:.7f}, max |diff| {max_diff:.2e}")

    rows = []
    for r in range(a.rounds):
        order = ("st", "attn") if r % 2 == 0 else ("attn", "st")
        for eng in order:
            if a.wait_idle is not None:
                wait_for_idle(a.wait_idle, a.wait_max)
            if eng == "st":
                row, emb = run_st(st, sentences, a)
            else:
                row, emb = run_attn(a, n)
                c, d = cosine_check(st_emb, emb)
                min_cos, max_diff = min(min_cos, c), max(max_diff, d)
            row["round"] = r
            rows.append(row)
            extra = f", whole process {row['process_sentences_per_s']:.1f}/s" if eng == "attn" else ""
            cpu = f", {row['sentences_per_cpu_s']:.1f}/cpu-s" if row["sentences_per_cpu_s"] else ""
            log(f"round {r} {row['engine']:>21}: {row['sentences_per_s']:7.1f} sentences/s "
                f"({row['seconds']:.3f} s{extra}{cpu}; other load {row['other_cores']:.2f} cores)")
    if min_cos < 0.999:
        raise SystemExit(f"embeddings disagree: min cosine {min_cos}")

    def stats(eng, key="sentences_per_s"):
        v = [x[key] for x in rows if x["engine"] == eng]
        return {"best": max(v), "median": statistics.median(v), "all": v}

    s_st, s_at, s_proc = stats("sentence-transformers"), stats("attn"), stats("attn", "process_sentences_per_s")
    # rounds on a quiet machine (others used < 0.25 cores), where both engines had their two cores
    quiet = {e: [x["sentences_per_s"] for x in rows if x["engine"] == e and x["other_cores"] < 0.25]
             for e in ("sentence-transformers", "attn")}
    summary = {
        "st_sentences_per_s": s_st,
        "attn_sentences_per_s": s_at,
        "attn_whole_process_sentences_per_s": s_proc,
        "ratio_best": s_at["best"] / s_st["best"],
        "ratio_median": s_at["median"] / s_st["median"],
        "ratio_whole_process_median": s_proc["median"] / s_st["median"],
        # sentences per CPU-second (all threads): the cost, less sensitive to other load than wall time
        "cpu": ({"st_sentences_per_cpu_s": stats("sentence-transformers", "sentences_per_cpu_s"),
                 "attn_sentences_per_cpu_s": stats("attn", "sentences_per_cpu_s"),
                 "ratio_median": stats("attn", "sentences_per_cpu_s")["median"]
                 / stats("sentence-transformers", "sentences_per_cpu_s")["median"]}
                if all(x["sentences_per_cpu_s"] for x in rows) else None),
        "quiet_rounds": {
            "st": quiet["sentence-transformers"], "attn": quiet["attn"],
            "ratio_median": (statistics.median(quiet["attn"]) / statistics.median(quiet["sentence-transformers"])
                             if quiet["attn"] and quiet["sentence-transformers"] else None),
        },
        "min_cosine": min_cos,
        "max_abs_diff": max_diff,
    }
    result = {
        "about": "all-MiniLM-L6-v2 sentence embeddings, attn embed vs sentence-transformers; "
                 "scripts/bench/compare_embeddings.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "flags": cpu_flags(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "sentence_transformers": version("sentence-transformers"),
                     "transformers": version("transformers"), "attn_commit": git_commit()},
        "setup": {"model": a.model, "sentences_file": (f"{source}, cut to {a.equal_length} word pieces each"
                                                        if tmp else source), "sentences": n,
                  "word_pieces": sum(lens), "batch_size": a.batch_size, "attn_int8": a.int8, "attn_f32": a.f32,
                  "attn_overhead_cpu_s": a.attn_overhead_cpu, "threads": a.threads,
                  "rounds": a.rounds, "wait_idle": a.wait_idle, "wait_max": a.wait_max},
        "summary": summary,
        "rounds": rows,
    }
    out = a.out or os.path.join(REPO, "scripts", "bench", "results",
                                f"minilm-embed-b{a.batch_size}-t{a.threads}"
                                f"{f'-len{a.equal_length}' if a.equal_length else ''}{'-int8' if a.int8 else ''}{'-f32' if a.f32 else ''}"
                                f"-{datetime.date.today()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"sentence-transformers {s_st['median']:.1f} sentences/s (best {s_st['best']:.1f})")
    print(f"attn                  {s_at['median']:.1f} sentences/s (best {s_at['best']:.1f}); "
          f"whole process incl. start and load {s_proc['median']:.1f}")
    print(f"ratio attn / sentence-transformers: median {summary['ratio_median']:.2f}x, "
          f"best {summary['ratio_best']:.2f}x, whole process {summary['ratio_whole_process_median']:.2f}x")
    if summary["cpu"]:
        c = summary["cpu"]
        print(f"per CPU-second: sentence-transformers {c['st_sentences_per_cpu_s']['median']:.1f}, attn "
              f"{c['attn_sentences_per_cpu_s']['median']:.1f} sentences; ratio of medians {c['ratio_median']:.2f}x")
    q = summary["quiet_rounds"]
    if q["ratio_median"] is not None:
        print(f"quiet rounds only (others < 0.25 cores): {len(q['attn'])} attn, {len(q['st'])} "
              f"sentence-transformers, ratio of medians {q['ratio_median']:.2f}x")
    print(f"agreement: min cosine {min_cos:.7f}, max |diff| {max_diff:.2e}")
    print(f"wrote {os.path.relpath(out, REPO)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Side-by-side speed of `attn bench` and llama.cpp's `llama-bench` on the same GGUF.

Same model file, same prompt length (prefill test), same number of generated tokens (decode
test), same thread count, in the same run; the two engines alternate round by round (ABBA
order, so neither always runs first on a warm or cold machine). Prints the machine, the
versions, one row per run, and a summary table with the attn/llama.cpp ratios.

    scripts/bench/compare_llamacpp.py                      # P=512 G=128 threads=2, 3 rounds
    scripts/bench/compare_llamacpp.py -p 128 -g 64 -t 1 --rounds 5 --markdown

llama.cpp is a reference only, never a dependency of attn: its llama-bench is built outside the
repo by scripts/bench/build_llamacpp.sh (called here unless --llama-bench is given).
attn is built with `cargo build --release -p attn-cli` unless --attn is given.

What is measured, for both engines alike:
  prefill tok/s   one forward pass over P tokens from an empty cache (llama-bench `pp P`)
  decode  tok/s   G single-token steps from a (nearly) empty cache (llama-bench `tg G`)
  peak RSS        the child process's peak resident set (wait4 rusage), model mapping included
Each engine reports the mean over its --repetitions within one invocation; the summary takes
the median over rounds. The script also measures CPU time used by *other* processes during
each run (from /proc/stat minus the child's own CPU time): on a shared machine that is what
makes numbers move, and llama.cpp's spin-waiting threads suffer most from it.

Standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HZ = os.sysconf("SC_CLK_TCK")


def default_model():
    home = os.environ.get("ATTN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "attn")
    return os.path.join(home, "models", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf")


def log(msg):
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# machine and load


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def core_counts():
    """(logical CPUs, physical cores) from /proc/cpuinfo; os.cpu_count() as a fallback."""
    logical, phys = 0, set()
    cur = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if cur:
                        logical += 1
                        phys.add((cur.get("physical id"), cur.get("core id")))
                    cur = {}
                    continue
                k, _, v = line.partition(":")
                cur[k.strip()] = v.strip()
        if cur:
            logical += 1
            phys.add((cur.get("physical id"), cur.get("core id")))
    except OSError:
        pass
    logical = logical or os.cpu_count() or 0
    return logical, len(phys) or logical


def mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def cpu_jiffies():
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user/nice
    return total - idle, total


def other_load_now(seconds=1.0):
    """Cores' worth of CPU used by everything on the machine over a short window."""
    b0, _ = cpu_jiffies()
    time.sleep(seconds)
    b1, _ = cpu_jiffies()
    return (b1 - b0) / HZ / seconds


def wait_for_idle(threshold, max_wait):
    """Wait (at most max_wait s) until other processes use less than `threshold` cores."""
    t0 = time.time()
    load = other_load_now()
    while load >= threshold and time.time() - t0 < max_wait:
        log(f"machine busy ({load:.2f} cores in use by others), waiting ...")
        time.sleep(4)
        load = other_load_now()
    return load, time.time() - t0


# ---------------------------------------------------------------------------------------------
# running a child and measuring it


def run_measured(cmd, env=None):
    """Run cmd; return (returncode, stdout, stderr, wall_s, child_cpu_s, peak_rss_mib, other_cores)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        b0, _ = cpu_jiffies()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        # wait4 gives this child's own rusage (peak RSS, CPU time), unlike RUSAGE_CHILDREN.
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        b1, _ = cpu_jiffies()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    child_cpu = ru.ru_utime + ru.ru_stime
    other = max(0.0, ((b1 - b0) / HZ - child_cpu) / wall) if wall > 0 else 0.0
    return p.returncode, stdout, stderr, wall, child_cpu, ru.ru_maxrss / 1024, other


def parse_json_output(text):
    """The JSON document in a program's stdout (tolerates log lines around it)."""
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for open_c, close_c in (("[", "]"), ("{", "}")):
        i, j = text.find(open_c), text.rfind(close_c)
        if 0 <= i < j:
            try:
                return json.loads(text[i : j + 1])
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON document in the output")


def run_llamacpp(a):
    cmd = [a.llama_bench, "-m", a.model, "-p", str(a.prompt_tokens), "-n", str(a.gen_tokens),
           "-t", str(a.threads), "-r", str(a.repetitions), "-o", "json"] + a.llama_args
    rc, out, err, wall, cpu, rss, other = run_measured(cmd)
    if rc != 0:
        raise RuntimeError(f"llama-bench exited {rc}:\n{err[-2000:]}")
    tests = parse_json_output(out)
    pp = [t for t in tests if t["n_prompt"] == a.prompt_tokens and t["n_gen"] == 0]
    tg = [t for t in tests if t["n_gen"] == a.gen_tokens and t["n_prompt"] == 0]
    if len(pp) != 1 or len(tg) != 1:
        raise RuntimeError(f"llama-bench output lacks pp{a.prompt_tokens}/tg{a.gen_tokens}")
    pp, tg = pp[0], tg[0]
    return {
        "engine": "llama.cpp", "prefill": pp["avg_ts"], "decode": tg["avg_ts"],
        "prefill_sd": pp["stddev_ts"], "decode_sd": tg["stddev_ts"],
        "prefill_samples": pp["samples_ts"], "decode_samples": tg["samples_ts"],
        "ttft_ms": None, "threads": pp["n_threads"], "wall_s": wall, "cpu_s": cpu,
        "peak_rss_mib": rss, "other_cores": other,
        "meta": {k: pp.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends",
                                        "model_type", "model_size", "n_batch", "n_ubatch",
                                        "type_k", "type_v", "flash_attn", "repack", "poll")},
    }


def run_attn(a):
    cmd = [a.attn, "bench", "-m", a.model, "--prompt-tokens", str(a.prompt_tokens),
           "--gen-tokens", str(a.gen_tokens), "--threads", str(a.threads),
           "--repetitions", str(a.repetitions), "--json"] + a.attn_args
    rc, out, err, wall, cpu, rss, other = run_measured(cmd)
    if rc != 0:
        raise RuntimeError(f"attn bench exited {rc}:\n{err[-2000:]}")
    j = parse_json_output(out)
    return {
        "engine": "attn", "prefill": j["prefill_tokens_per_s"], "decode": j["decode_tokens_per_s"],
        "prefill_sd": None, "decode_sd": None, "ttft_ms": j.get("ttft_ms"),
        "threads": j.get("threads"), "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss,
        "self_reported_peak_rss_mb": j.get("peak_rss_mb"), "other_cores": other, "meta": j,
    }


# ---------------------------------------------------------------------------------------------
# setup


def git(*args):
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def attn_version():
    commit = git("rev-parse", "--short=10", "HEAD")
    if commit is None:
        return "unknown"
    # Modified tracked files under crates/ or Cargo.* mean the binary is not exactly `commit`.
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "crates", "Cargo.toml",
                "Cargo.lock")
    return commit + ("+dirty" if dirty else "")


def ensure_llama_bench(a):
    if a.llama_bench:
        return
    script = os.path.join(REPO, "scripts", "bench", "build_llamacpp.sh")
    log("llama-bench: scripts/bench/build_llamacpp.sh (reuses an existing build)")
    r = subprocess.run([script], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit("error: building llama-bench failed")
    a.llama_bench = r.stdout.strip().splitlines()[-1]


def llama_source(llama_bench):
    """', vendored by <pkg> <version>' from build_llamacpp.sh's stamp next to the build."""
    stamp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(llama_bench))),
                         ".attn-bench-stamp")
    try:
        with open(stamp) as f:
            words = f.read().split()
        flags = " ".join(w[2:] for w in words if w.startswith("-DGGML_"))
        return f", vendored by {words[0]} {words[1]}, {flags}"
    except (OSError, IndexError):
        return ""


def ensure_attn(a):
    if a.attn:
        return
    if not a.no_build:
        log("attn: cargo build --release -p attn-cli")
        r = subprocess.run(["cargo", "build", "--release", "-p", "attn-cli"], cwd=REPO)
        if r.returncode != 0:
            sys.exit("error: cargo build --release -p attn-cli failed")
    a.attn = os.path.join(REPO, "target", "release", "attn")


def attn_has_bench(path):
    try:
        r = subprocess.run([path, "bench", "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and "--prompt-tokens" in r.stdout


# ---------------------------------------------------------------------------------------------
# report


def fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def summarize(rows, engine):
    rs = [r for r in rows if r["engine"] == engine]
    if not rs:
        return None

    def med(key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def span(key):
        vals = [r[key] for r in rs]
        return (min(vals), max(vals))

    return {"engine": engine, "n": len(rs), "prefill": med("prefill"), "decode": med("decode"),
            "prefill_range": span("prefill"), "decode_range": span("decode"),
            "ttft_ms": med("ttft_ms"), "peak_rss_mib": med("peak_rss_mib"),
            "other_cores": max(r["other_cores"] for r in rs)}


def table(headers, body, markdown, left=1):
    """The first `left` columns are text (left-aligned), the others numbers (right-aligned)."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers)] + [line(row) for row in body])


def report(a, info, rows, attn_pending):
    md = a.markdown
    p, g, t = a.prompt_tokens, a.gen_tokens, a.threads
    L = []
    L.append(f"date        {info['date']}")
    L.append(f"machine     {info['cpu']}, {info['logical']} logical CPUs ({info['physical']} cores), "
             f"{fmt(info['mem_gib'])} GiB RAM, {info['kernel']}")
    L.append(f"model       {a.model} ({info['model_mib']:.1f} MiB)")
    L.append(f"llama.cpp   {info['llama_version']}")
    L.append(f"attn        {info['attn_version']}" + ("  (attn bench not available: pending)" if attn_pending else ""))
    L.append(f"settings    prompt {p} tokens, generate {g} tokens, {t} threads, "
             f"{a.rounds} rounds x {a.repetitions} repetitions per engine, alternating")
    if md:
        L = ["    " + x for x in L]
    print("\n".join(L))
    print()

    # per run
    body = []
    for r in rows:
        body.append([f"{r['round']}", r["engine"], fmt(r["prefill"]), fmt(r["decode"]),
                     fmt(r["ttft_ms"]), fmt(r["peak_rss_mib"], 0), fmt(r["wall_s"]),
                     fmt(r["other_cores"], 2)])
    print(table(["round", "engine", f"prefill tok/s (pp{p})", f"decode tok/s (tg{g})",
                 "ttft ms", "peak RSS MiB", "wall s", "others' load (cores)"], body, md, left=2))
    print()

    # summary
    s_l, s_a = summarize(rows, "llama.cpp"), summarize(rows, "attn")
    body = []
    for s in (s_l, s_a):
        if s is None:
            body.append(["attn", "pending", "pending", "-", "-"])
            continue
        body.append([s["engine"],
                     f"{fmt(s['prefill'])} ({fmt(s['prefill_range'][0])}-{fmt(s['prefill_range'][1])})",
                     f"{fmt(s['decode'])} ({fmt(s['decode_range'][0])}-{fmt(s['decode_range'][1])})",
                     fmt(s["ttft_ms"]), fmt(s["peak_rss_mib"], 0)])
    if s_l and s_a:
        body.append(["attn / llama.cpp", f"{s_a['prefill'] / s_l['prefill']:.2f}x",
                     f"{s_a['decode'] / s_l['decode']:.2f}x", "", 
                     f"{s_a['peak_rss_mib'] / s_l['peak_rss_mib']:.2f}x"])
    print(table(["engine", "prefill tok/s, median (min-max)", "decode tok/s, median (min-max)",
                 "ttft ms", "peak RSS MiB"], body, md))
    # Paired ratios: each round runs both engines back to back, so slow drifts of the machine
    # (which move both) cancel better within a round than across the whole run.
    paired = {"prefill": [], "decode": []}
    for rnd in sorted({r["round"] for r in rows}):
        by = {r["engine"]: r for r in rows if r["round"] == rnd}
        if "attn" in by and "llama.cpp" in by:
            for k in paired:
                paired[k].append(by["attn"][k] / by["llama.cpp"][k])
    if paired["prefill"]:
        print()
        print("attn / llama.cpp within each round: prefill "
              + " ".join(f"{x:.2f}" for x in paired["prefill"]) + ", decode "
              + " ".join(f"{x:.2f}" for x in paired["decode"]))
    busiest = max((r["other_cores"] for r in rows), default=0.0)
    if busiest > a.noisy:
        print()
        print(f"note: other processes used up to {busiest:.2f} cores during a run; "
              f"numbers from such runs are low and noisy (see 'others' load').")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=default_model(), help="GGUF file (default: %(default)s)")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-g", "--gen-tokens", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two engines")
    ap.add_argument("-r", "--repetitions", type=int, default=2,
                    help="repetitions inside each engine invocation (both report the mean)")
    ap.add_argument("--llama-bench", help="llama-bench binary (default: build_llamacpp.sh)")
    ap.add_argument("--attn", help="attn binary (default: target/release/attn, built first)")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build")
    ap.add_argument("--llama-only", action="store_true", help="run llama.cpp only")
    ap.add_argument("--llama-args", default="", help="extra llama-bench arguments, one string")
    ap.add_argument("--attn-args", default="", help="extra attn bench arguments, one string")
    ap.add_argument("--wait-idle", type=float, metavar="CORES", default=None,
                    help="before each run wait until others use fewer than CORES cores")
    ap.add_argument("--wait-max", type=float, default=300, help="longest wait per run, s")
    ap.add_argument("--noisy", type=float, default=0.25,
                    help="flag the result when others used more cores than this during a run")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--json-out", help="also write all runs and metadata to this file")
    ap.add_argument("--from-json", metavar="FILE",
                    help="print the report of a run saved with --json-out (runs nothing)")
    a = ap.parse_args()
    if a.from_json:
        with open(a.from_json) as f:
            saved = json.load(f)
        for k in ("model", "prompt_tokens", "gen_tokens", "threads", "rounds", "repetitions"):
            setattr(a, k, saved["args"][k])
        rows = saved["runs"]
        report(a, saved["info"], rows, not any(r["engine"] == "attn" for r in rows))
        return
    a.llama_args = a.llama_args.split()
    a.attn_args = a.attn_args.split()

    if not os.path.isfile(a.model):
        sys.exit(f"error: model not found: {a.model} (run `attn pull gemma3-270m` or pass -m)")
    ensure_llama_bench(a)
    a.attn_given = a.attn is not None
    attn_pending = a.llama_only
    if not a.llama_only:
        ensure_attn(a)
        if not attn_has_bench(a.attn):
            log(f"{a.attn} has no working `bench` subcommand: running llama.cpp only")
            attn_pending = True

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(), "mem_gib": mem_total_gib(),
        "kernel": f"{platform.system()} {platform.release()}",
        "model_mib": os.path.getsize(a.model) / 2**20,
        "attn_version": attn_version(), "llama_version": "?",
    }
    if a.no_build or a.attn_given:
        info["attn_version"] += f" (source tree; binary {a.attn} not rebuilt by this run)"
    info["logical"], info["physical"] = core_counts()

    engines = [("llama.cpp", run_llamacpp)] + ([] if attn_pending else [("attn", run_attn)])
    rows = []
    for rnd in range(1, a.rounds + 1):
        order = engines if rnd % 2 == 1 else engines[::-1]
        for name, fn in order:
            if a.wait_idle is not None:
                load, waited = wait_for_idle(a.wait_idle, a.wait_max)
                if waited > 2:
                    log(f"waited {waited:.0f} s; others now use {load:.2f} cores")
            log(f"round {rnd}/{a.rounds}: {name}")
            r = fn(a)
            r["round"] = rnd
            if r["threads"] is not None and r["threads"] != a.threads:
                log(f"  warning: {name} reports {r['threads']} threads, {a.threads} were asked for")
            rows.append(r)
            log(f"  prefill {r['prefill']:.1f} tok/s, decode {r['decode']:.1f} tok/s, "
                f"others' load {r['other_cores']:.2f} cores")

    lm = next(r["meta"] for r in rows if r["engine"] == "llama.cpp")
    info["llama_version"] = (f"llama.cpp {lm['build_commit']} (build {lm['build_number']})"
                             f"{llama_source(a.llama_bench)}, backend {lm['backends']}, "
                             f"flash_attn {lm['flash_attn']}, repack {lm['repack']}, "
                             f"n_ubatch {lm['n_ubatch']}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"info": info, "args": {k: v for k, v in vars(a).items()}, "runs": rows}, f, indent=1)
    report(a, info, rows, attn_pending)


if __name__ == "__main__":
    main()

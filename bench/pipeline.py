"""End to end: `python train.py --stage all` as a subprocess, per-stage wall time and memory.

    python bench/pipeline.py                    # mini config, all five stages (long)
    python bench/pipeline.py --quick            # tiny config: a smoke run of the pipeline
    python bench/pipeline.py --stage pretrain --threads 1 -- --pretrain.max_steps=100

Checkpoints and run logs go to runs/bench/pipeline/<config>/ (wiped at the start), never to
the user's checkpoints/. Stage times come from the run's summary.json ('time_s', written by
train.py), so they exclude interpreter start-up; memory is the child's resident set, sampled
from /proc/<pid>/status every 0.2 s (peak VmRSS while each stage ran) plus its VmHWM and
getrusage(RUSAGE_CHILDREN).ru_maxrss at the end. Arguments after `--` go to train.py.
Writes runs/bench/pipeline.json (pipeline-tiny.json with --quick); the child's output is in
runs/bench/pipeline/<config>/train.log.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

import common as C

STAGE_LINE = re.compile(r"^=== (\w+) ===\s*$")


def parse_args():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mini", choices=["tiny", "mini"])
    ap.add_argument("--stage", default="all")
    ap.add_argument("--threads", type=int, default=None, help="passed to train.py (default: its own)")
    ap.add_argument("--quick", action="store_true", help="--config tiny")
    ap.add_argument("--echo", action="store_true", help="echo the child's whole output")
    args = ap.parse_args(argv)
    if args.quick:
        args.config = "tiny"
    args.extra = extra
    return args


def read_status(pid: int) -> dict:
    """{'VmRSS': kB, 'VmHWM': kB} of a live process (empty once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def main():
    args = parse_args()
    out = os.path.join(C.OUT_DIR, "pipeline", args.config)
    ckpt_dir, runs_dir = os.path.join(out, "checkpoints"), os.path.join(out, "runs")
    shutil.rmtree(out, ignore_errors=True)          # our own scratch space only
    os.makedirs(out)
    run_id = time.strftime("%Y%m%d-%H%M%S")
    cmd = [sys.executable, os.path.join(C.ROOT, "train.py"), "--stage", args.stage, "--config", args.config,
           "--ckpt-dir", ckpt_dir, "--runs-dir", runs_dir, "--run-id", run_id, "--no-progress"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += args.extra
    print("running:", " ".join(cmd))

    load0 = C.loadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=C.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    state = {"stage": "(start-up)", "hwm": 0}
    peak = {}                                       # stage -> max sampled VmRSS (kB)
    done = threading.Event()

    def poll():
        while not done.is_set():
            st = read_status(proc.pid)
            if st:
                s = state["stage"]
                peak[s] = max(peak.get(s, 0), st.get("VmRSS", 0))
                state["hwm"] = max(state["hwm"], st.get("VmHWM", 0))
            done.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with open(os.path.join(out, "train.log"), "w", encoding="utf-8") as log:
        for line in proc.stdout:
            log.write(line)
            m = STAGE_LINE.match(line)
            if m:
                state["stage"] = m.group(1)
            if args.echo or m or line.startswith(("run ", "error", "Traceback")) or ": held-out" in line:
                print(line, end="", flush=True)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    load1 = C.loadavg()
    ru_maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss   # kB on Linux
    if rc != 0:
        print(f"\ntrain.py exited with code {rc}; see {os.path.join(out, 'train.log')}")

    summary_path = os.path.join(runs_dir, run_id, "summary.json")
    summary = json.load(open(summary_path, encoding="utf-8")) if os.path.exists(summary_path) else {}
    rows, results = [], []
    for stage, figs in summary.items():
        if not isinstance(figs, dict) or "time_s" not in figs:
            continue
        rss = peak.get(stage, 0) / 1024
        results.append(dict(stage=stage, time_s=figs["time_s"], peak_rss_mb=rss, headline=figs.get("headline", "")))
        rows.append([stage, figs["time_s"], rss, figs.get("headline", "")])
    stage_sum = sum(r["time_s"] for r in results)
    rows.append(["total", wall, max(peak.values(), default=0) / 1024,
                 f"wall incl. start-up and vocabulary ({wall - stage_sum:.1f} s outside stages)"])
    print(f"\npipeline, config {args.config}, stage {args.stage}, threads {args.threads or 'train.py default'}; "
          f"load avg before/after {load0[0]:.2f}/{load1[0]:.2f}\n")
    print(C.table(["stage", "time s", "peak RSS MB", "headline"], rows, [None, ".1f", ".0f", None], left=(0, 3)))
    print(f"\npeak RSS of the child: VmHWM {state['hwm'] / 1024:.0f} MB, ru_maxrss {ru_maxrss_kb / 1024:.0f} MB")
    name = "pipeline" if args.config == "mini" else f"pipeline-{args.config}"
    path = C.write_json(name, dict(
        meta=C.meta(args.threads, config=args.config, stage=args.stage, cmd=cmd, returncode=rc,
                    loadavg_before=load0, loadavg_after=load1),
        wall_s=wall, vm_hwm_mb=state["hwm"] / 1024, ru_maxrss_mb=ru_maxrss_kb / 1024,
        peak_rss_mb_by_phase={k: v / 1024 for k, v in peak.items()}, stages=results, summary=summary))
    print(f"\nwrote {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())

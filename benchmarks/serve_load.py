"""A bounded load test of `cxr serve` on loopback: starts the server as a subprocess, sends
REQUESTS POST /predict requests (one real radiograph each) from CONCURRENCY threads, stops at the
time cap, and prints errors, latency percentiles, requests/s and the server's memory (RSS) before
and after.

    python benchmarks/serve_load.py --checkpoint runs/gen/robust/seed0/best.pt \
        --image ../shared/data/chest_xray_originals/PNEUMONIA/person1078_virus_1788.jpeg \
        --requests 500 --concurrency 16 --cap 600
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cap", type=float, default=600, help="stop sending after this many seconds")
    p.add_argument("--cam", action="store_true", help="ask for the CAM as well (?cam=true)")
    p.add_argument("--no-lock", action="store_true", help="let forward passes overlap (the server's default "
                   "serialises them)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cxr", "serve", str(args.checkpoint), "--port", str(port),
                               "--device", "cpu", *(["--no-lock"] if args.no_lock else [])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("server did not start: " + (server.stdout.read() if server.stdout else ""))
        content = args.image.read_bytes()
        files = {"files": (args.image.name, content, "image/jpeg")}
        httpx.post(f"{url}/predict", files=files, timeout=120)  # warm-up, not counted
        rss_start = rss_mb(server.pid)
        deadline = time.perf_counter() + args.cap
        latencies, errors, peak = [], [], [rss_start]
        lock = threading.Lock()

        def one(_):
            if time.perf_counter() > deadline:
                return
            start = time.perf_counter()
            try:
                r = httpx.post(f"{url}/predict" + ("?cam=true" if args.cam else ""), files=files, timeout=120)
                ok = r.status_code == 200
                why = None if ok else f"{r.status_code} {r.text[:100]}"
            except httpx.HTTPError as e:
                ok, why = False, repr(e)
            with lock:
                latencies.append(time.perf_counter() - start)
                if not ok:
                    errors.append(why)
                if len(latencies) % 50 == 0:
                    peak.append(rss_mb(server.pid))

        wall = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - wall
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(10)
    lat = np.array(latencies) * 1000
    print(f"machine: {os.cpu_count()} CPUs; checkpoint {args.checkpoint}; image {args.image.name} "
          f"({len(content) / 1e3:.0f} kB); cam {args.cam}; forward passes {'overlapping' if args.no_lock else 'serialised'}")
    print(f"requests {len(lat)} of {args.requests} (cap {args.cap:g} s), concurrency {args.concurrency}, "
          f"errors {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print(f"latency ms: p50 {np.percentile(lat, 50):.0f}  p95 {np.percentile(lat, 95):.0f}  "
          f"p99 {np.percentile(lat, 99):.0f}  max {lat.max():.0f}")
    print(f"throughput: {len(lat) / wall:.1f} requests/s over {wall:.1f} s")
    print(f"server RSS MB: after warm-up {rss_start:.0f}, every 50 requests {[round(x) for x in peak[1:]]}, "
          f"end {rss_end:.0f}")
    if args.json:
        args.json.write_text(json.dumps({
            "cpus": os.cpu_count(), "requests": len(lat), "errors": len(errors), "concurrency": args.concurrency,
            "cam": args.cam, "lock": not args.no_lock, "latency_ms": {q: float(np.percentile(lat, int(q[1:])))
                                                                       for q in ("p50", "p95", "p99")},
            "requests_per_s": len(lat) / wall, "rss_mb": {"start": rss_start, "end": rss_end}}, indent=1) + "\n")


if __name__ == "__main__":
    main()

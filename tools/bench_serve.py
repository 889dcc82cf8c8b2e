"""Serving figures: tokens/s and p50/p95 latency at 1, 4 and 16 concurrent clients, and the server's overhead.

The overhead compares, in the same run and on the same backend instance, a request through the HTTP server (the
openai client on loopback, non-streamed) with a direct ``backend.generate`` call for the same prompt; at one
client the two alternate request by request, so drift on a shared machine falls on both alike. Target: at most
5% at one client.

    .venv/bin/python tools/bench_serve.py                       # embedded default image model, text questions
    .venv/bin/python tools/bench_serve.py --image --max-tokens 64
    .venv/bin/python tools/bench_serve.py --model PATH --concurrency 1,4,16 --per-client 2
    .venv/bin/python tools/bench_serve.py --threads 1            # on a busy machine (others' jobs on the cores)

Besides the paired difference, it prints the server's time outside the backend (request latency minus the
generation time the server itself measured), which the noise of a shared machine does not swamp.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "Describe the findings of a normal chest radiograph in detail.",
    "Explain what a pleural effusion looks like on a chest X-ray.",
    "List the steps of reading a head CT scan, one per line.",
    "What are the signs of pneumonia on imaging? Explain each.",
]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def picture():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(96, 96, 3) * 255).astype("uint8"))


def start_server(backend, folder, max_queue: int):
    import uvicorn

    from edgemed.serve import ServeConfig, create_app

    app = create_app(ServeConfig(export_dir=folder, max_queue=max_queue, max_tokens_cap=4096), backend)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:smollm2-135m-llava", help="embedded:NAME or an export/model folder")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="alternating direct/served requests at one client")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client above one client")
    ap.add_argument("--image", action="store_true", help="ask about a synthetic image (image models)")
    ap.add_argument("--threads", type=int, help="torch/llama.cpp threads")
    args = ap.parse_args()

    import httpx
    import openai

    from edgemed import embedded
    from edgemed.backends import open_model
    from edgemed.backends.base import GenParams

    folder = embedded.resolve(args.model)
    kw = {"n_threads": args.threads} if args.threads else {}
    backend = open_model(folder, verify=False, **kw)
    img = picture() if args.image else None
    if img is not None and not backend.is_vision:
        raise SystemExit(f"{folder} is a text model; drop --image")
    url = None
    if img is not None:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    params = GenParams(max_tokens=args.max_tokens)

    def messages(q: str) -> list[dict]:
        if url is None:
            return [{"role": "user", "content": q}]
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": q}]}]

    def direct(q: str) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        text = "".join(backend.generate(backend.render(q, image=img is not None), img, params))
        dt = time.perf_counter() - t0
        return dt, max(0, len(backend.tokenize(text)) - len(backend.tokenize(""))), text

    server, thread, base = start_server(backend, folder, max_queue=64)

    def served(client, q: str) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model="m", messages=messages(q), max_tokens=args.max_tokens,
                                           temperature=0.0)
        return time.perf_counter() - t0, r.usage.completion_tokens, r.choices[0].message.content

    def gen_seconds() -> float:  # the server's own account of time spent inside the backend
        return httpx.get(base[: -len("/v1")] + "/metrics", timeout=30).json()["generation_seconds"]

    print(f"model {folder} ({backend.name}, {'image' if img is not None else 'text'} questions, "
          f"max_tokens {args.max_tokens}, threads {args.threads or f'default (torch {_threads()})'})")
    client = openai.OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)
    direct(QUESTIONS[0])  # warm-up: first-call allocations and caches
    served(client, QUESTIONS[0])

    d_lat, s_lat, inside, d_tok, s_tok, mismatches = [], [], [], 0, 0, 0
    for i in range(args.rounds):
        q = QUESTIONS[i % len(QUESTIONS)]
        if i % 2 == 0:
            dr = direct(q)
            g0 = gen_seconds()
            sr = served(client, q)
            inside.append(gen_seconds() - g0)
        else:
            g0 = gen_seconds()
            sr = served(client, q)
            inside.append(gen_seconds() - g0)
            dr = direct(q)
        d_lat.append(dr[0])
        s_lat.append(sr[0])
        d_tok += dr[1]
        s_tok += sr[1]
        mismatches += dr[2] != sr[2]

    rows = [("direct", 1, len(d_lat), d_tok / sum(d_lat), pct(d_lat, 0.5), pct(d_lat, 0.95)),
            ("server", 1, len(s_lat), s_tok / sum(s_lat), pct(s_lat, 0.5), pct(s_lat, 0.95))]
    for c in [int(x) for x in args.concurrency.split(",") if int(x) > 1]:
        lats, toks, lock = [], [0], threading.Lock()
        barrier = threading.Barrier(c)

        def worker(k: int, lats=lats, toks=toks, lock=lock, barrier=barrier) -> None:
            cl = openai.OpenAI(base_url=base, api_key="bench", max_retries=0, timeout=600)
            barrier.wait()
            for j in range(args.per_client):
                dt, n, _ = served(cl, QUESTIONS[(k + j) % len(QUESTIONS)])
                with lock:
                    lats.append(dt)
                    toks[0] += n

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows.append(("server", c, len(lats), toks[0] / wall, pct(lats, 0.5), pct(lats, 0.95)))

    print(f"{'path':8} {'clients':>7} {'requests':>8} {'tokens/s':>9} {'p50 s':>8} {'p95 s':>8}")
    for path, c, n, tps, p50, p95 in rows:
        print(f"{path:8} {c:7d} {n:8d} {tps:9.2f} {p50:8.3f} {p95:8.3f}")
    d_med, s_med = statistics.median(d_lat), statistics.median(s_lat)
    d_mean, s_mean = statistics.mean(d_lat), statistics.mean(s_lat)
    print(f"server overhead at 1 client: median {100 * (s_med - d_med) / d_med:+.1f}% "
          f"({1000 * (s_med - d_med):+.1f} ms/request), mean {100 * (s_mean - d_mean) / d_mean:+.1f}% "
          f"(target <= +5%)")
    outside = [s - g for s, g in zip(s_lat, inside, strict=True)]
    print(f"server time outside the backend at 1 client (request latency - the server's generation time): "
          f"median {1000 * statistics.median(outside):.1f} ms = "
          f"{100 * statistics.median(o / s for o, s in zip(outside, s_lat, strict=True)):.1f}% of a request")
    print(f"answers identical direct vs server: {args.rounds - mismatches}/{args.rounds}")
    server.should_exit = True
    thread.join(10)
    backend.close()


def _threads() -> int:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return 0


if __name__ == "__main__":
    main()

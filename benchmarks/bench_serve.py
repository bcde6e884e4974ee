"""Serving throughput and latency: continuous batching vs one request at a time, side by side.

Starts the real server (uvicorn, 127.0.0.1, a free port) twice on the same model, once with the engine's
default batch (continuous batching) and once with max_num_seqs=1, and drives each with 1, 8 and 32
concurrent streaming clients. Prints completion tokens/s, requests/s and p50/p99 request latency, and the
throughput ratio per concurrency level (target: >= 4x at 32 clients).

    python benchmarks/bench_serve.py                  # a random model of the `tiny` preset, built in memory
    python benchmarks/bench_serve.py --model runs/speedrun/rl --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import tempfile
import threading
import time

import httpx
import torch
import uvicorn

from seekling.engine import Engine
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.serve.app import create_app
from seekling.serve.security import Settings
from seekling.tokenizer import train_tokenizer


def build_engine(args, max_num_seqs: int) -> Engine:
    if args.model:
        return Engine(args.model, max_num_seqs=max_num_seqs)
    tok = build_engine.tok = getattr(build_engine, "tok", None) or train_tokenizer(
        ["The answer is 42. Let me think step by step: 7 + 5 = 12, then 12 * 3 = 36."] * 50, vocab_size=512
    )
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512)).eval()
    return Engine(model, tok, max_num_seqs=max_num_seqs)


def start_server(engine: Engine, data_dir: str) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, Settings(model_name="bench", data_dir=data_dir, max_queue=10_000))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


async def one_request(http: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, int]:
    """Stream one chat completion; returns (latency s, completion tokens)."""
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": f"What is {i} + {2 * i + 7}?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
    }
    start, tokens = time.perf_counter(), 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, tokens


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:

        async def client(c: int) -> list[tuple[float, int]]:
            return [await one_request(http, url, c * per_client + k, max_tokens) for k in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "tok_s": sum(r[1] for r in results) / wall,
        "req_s": len(results) / wall,
        "p50": statistics.median(latencies),
        "p99": p99,
        "tokens": sum(r[1] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a random `tiny` model built in memory)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, dict[int, dict]] = {}
    for mode, max_num_seqs in (("batched", 64), ("one-at-a-time", 1)):
        engine = build_engine(args, max_num_seqs)
        with tempfile.TemporaryDirectory() as data_dir:
            server, thread, url = start_server(engine, data_dir)
            asyncio.run(load(url, 2, 1, 4))  # warm-up
            results[mode] = {}
            for c in args.clients:
                per_client = max(1, args.requests // c)
                results[mode][c] = r = asyncio.run(load(url, c, per_client, args.max_tokens))
                print(
                    f"{mode:>14} clients={c:>3}: {r['tok_s']:7.1f} tok/s {r['req_s']:6.2f} req/s "
                    f"p50 {r['p50']:6.2f} s p99 {r['p99']:6.2f} s ({r['tokens']} tokens)",
                    flush=True,
                )
            server.should_exit = True
            thread.join()

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
        f"max_tokens {args.max_tokens}, {args.requests} requests per level"
    )
    print(
        f"{'clients':>8} {'batched tok/s':>14} {'1-at-a-time tok/s':>18} {'ratio':>6} {'p50 b/1':>14} {'p99 b/1':>14}"
    )
    for c in args.clients:
        b, o = results["batched"][c], results["one-at-a-time"][c]
        print(
            f"{c:>8} {b['tok_s']:>14.1f} {o['tok_s']:>18.1f} {b['tok_s'] / o['tok_s']:>5.1f}x "
            f"{b['p50']:>6.2f}/{o['p50']:<6.2f} {b['p99']:>6.2f}/{o['p99']:<6.2f}"
        )


if __name__ == "__main__":
    main()

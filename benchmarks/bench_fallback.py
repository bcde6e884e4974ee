"""Decode speed without a C++ compiler: seekling's kernels vs the path that runs when they cannot be built.

Each measurement is a fresh process (bench_llamacpp's worker) on the random Qwen2.5-0.5B-shape model; the
no-compiler one runs with CXX=/bin/false and empty extension caches, so the kernel build really fails and the
startup log's fallback (torch's fbgemm int8 linear) runs. Rounds alternate between the two; the median of
--repeats is kept. Target: the fallback at >= 1/3 of the kernels' tokens/s, for int8 and int4.

    PYTHONPATH=. python benchmarks/bench_fallback.py --threads 1 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_llamacpp  # noqa: E402


def run(spec: dict, env: dict[str, str], work: Path) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as f:
        json.dump(spec, f)
    proc = subprocess.run([sys.executable, bench_llamacpp.__file__, "--worker", f.name], capture_output=True,
                          text=True, env=env)
    Path(f.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["log"] = [line for line in proc.stderr.splitlines() if "matmul path" in line]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kinds", nargs="+", default=["int8", "int4"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/seekling-bench-llamacpp"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = bench_llamacpp.machine()
    print(f"{info['date']}  {info['cpu']} ({info['cores']} cores)  load average {info['load_average'][0]:.2f}  "
          f"torch {info['torch']}")
    model = bench_llamacpp.prepare_dense(args.workdir, 0)
    vocab = bench_llamacpp.DENSE_SHAPE["vocab_size"]
    prompts = bench_llamacpp.random_prompts(args.repeats + 1, 32, vocab, 0)
    base = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    empty = Path(tempfile.mkdtemp(prefix="no-compiler-"))
    envs = {"kernels": base,
            "no compiler": {**base, "CXX": "/bin/false", "CC": "/bin/false", "TORCH_EXTENSIONS_DIR": str(empty),
                            "XDG_CACHE_HOME": str(empty)}}
    results = {}
    for kind in args.kinds:
        rates: dict[str, list[float]] = {name: [] for name in envs}
        logs = {}
        for r in range(args.repeats):
            for name, env in envs.items():
                spec = {"side": "seekling", "mode": "speed", "model": str(model), "quantize": kind,
                        "threads": args.threads, "new_tokens": args.new_tokens, "compile": False,
                        "llama_precision": "default", "n_seq": 1, "repeats": 1, "warmup": prompts[-1],
                        "prompts1": [prompts[r]], "prompts_batch": [[prompts[r]]], "prompts_prefill": [prompts[r]],
                        "n_ctx": 128}
                out = run(spec, env, args.workdir)
                rates[name] += out["decode1"]
                logs[name] = out["log"]
        results[kind] = {name: statistics.median(v) for name, v in rates.items()} | {"logs": logs}
        k, f = results[kind]["kernels"], results[kind]["no compiler"]
        print(f"{kind}: kernels {k:.2f} tok/s, no compiler {f:.2f} tok/s: {f / k:.2f} of the kernels' speed "
              f"(target >= 0.33); runs: {rates}")
        for name, lines in logs.items():
            print(f"  {name}: {lines[-1] if lines else '(no startup line)'}")
    bench_llamacpp.finish(args.json, info, results)


if __name__ == "__main__":
    main()

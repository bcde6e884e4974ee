"""The `seekling` command. Each subcommand's work lives in its module; this file only wires flags.

    seekling speedrun --preset default --out runs/speedrun
    seekling chat --model runs/speedrun/rl
    seekling serve --model runs/speedrun/rl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from seekling.atomic import DiskFull
from seekling.train.trainer import add_train_flags, train_config


# --- small commands that have no module of their own ---------------------------------------------------
def cmd_tokenizer(args: argparse.Namespace) -> None:
    from seekling.tokenizer import train_tokenizer

    if args.input:
        from seekling.data import read_documents

        texts = list(read_documents(args.input))
    else:
        from seekling.speedrun import pretrain_documents

        texts = pretrain_documents(args.corpus_per_task)
    tok = train_tokenizer(texts, args.vocab_size)
    tok.save_pretrained(args.out)
    print(f"tokenizer with {tok.vocab_size} tokens ({len(texts)} documents) -> {args.out}")


def cmd_data(args: argparse.Namespace) -> None:
    from seekling.data import read_documents, write_shards
    from seekling.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    index = write_shards((tok.encode(d) for d in read_documents(args.input)), args.out,
                         eos_id=tok.eos_token_id, vocab_size=tok.vocab_size)
    print(f"{index['num_docs']} documents, {index['num_tokens']:,} tokens -> {args.out}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    import torch

    from seekling.data import BatchLoader, PackedDataset
    from seekling.model import Transformer
    from seekling.model.config import preset
    from seekling.model.load import load_pretrained
    from seekling.tokenizer import load_tokenizer
    from seekling.train.trainer import train

    tok = load_tokenizer(args.tokenizer)
    if args.init:
        model = load_pretrained(args.init)
    else:
        torch.manual_seed(args.seed)
        model = Transformer(preset(args.preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id))
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters")
    data = PackedDataset(args.data, args.seq_len)
    train(model, BatchLoader(data, args.batch_size, seed=args.seed), train_config(args), args.out,
          resume=args.resume)
    tok.save_pretrained(args.out)


def cmd_sft(args: argparse.Namespace) -> None:
    from seekling.data import BatchLoader, SFTDataset
    from seekling.model.load import load_pretrained
    from seekling.tokenizer import load_tokenizer
    from seekling.train.trainer import train

    tok = load_tokenizer(args.model)
    if args.traces:
        from seekling.train.collect import load_traces

        conversations = [m for path in args.traces for m in load_traces(path, only_correct=args.only_correct)]
    else:
        from seekling.speedrun import sft_messages

        conversations = sft_messages(tuple(args.levels), args.per_level)
    if not conversations:
        raise SystemExit("no SFT samples (are the traces empty, or all rejected?)")
    data = SFTDataset([tok.encode_sft(m) for m in conversations], args.seq_len, pad_id=tok.pad_token_id,
                      truncate=args.truncate)
    print(f"SFT on {len(data)} conversations")
    model = load_pretrained(args.model)
    train(model, BatchLoader(data, args.batch_size, seed=args.seed), train_config(args), args.out,
          resume=args.resume)
    tok.save_pretrained(args.out)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory, GGUF file or ollama:NAME[:TAG]")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--compile", action="store_true",
                   help="compile the Python decode step (models the C++ step does not run: dense, int8/int4; "
                        "~30 s the first time)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="int8 (Q8_0's format) or int4 (4.6 bits a weight, the head at 8) weights on the CPU, "
                        "quantised as a model directory is read (a GGUF keeps its own bits)")


def _engine_and_params(args: argparse.Namespace):
    from seekling.engine import Engine, SamplingParams

    if args.compile:
        print("compiling the decode graph (~30 s the first time; torch caches it on disk)...", file=sys.stderr)
    engine = Engine(args.model, speculative=args.speculative, compile=args.compile, quantize=args.quantize)
    gen = engine.generation_defaults  # generation_config.json's, or a GGUF's general.sampling.*
    temperature = args.temperature if args.temperature is not None else gen.get("temperature", 0.6)
    top_p = args.top_p if args.top_p is not None else gen.get("top_p", 0.95)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                            seed=args.seed)
    return engine, params


def cmd_sample(args: argparse.Namespace) -> None:
    engine, params = _engine_and_params(args)
    prompts = args.prompt or ["What is 123 + 989?"]
    messages = [p if args.raw else [{"role": "user", "content": p}] for p in prompts]
    for prompt, out in zip(prompts, engine.generate(messages, params), strict=True):
        print(f"### {prompt}")
        if out.reasoning:
            print(f"<think>\n{out.reasoning}\n</think>")
        print(out.text)
        error = f" ({out.outputs[0].error})" if out.outputs[0].error else ""
        print(f"[{len(out.token_ids)} tokens, finish: {out.finish_reason}{error}]\n")


def cmd_chat(args: argparse.Namespace) -> None:
    """A terminal chat on the same engine path as the server; earlier turns go back without reasoning."""
    engine, params = _engine_and_params(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    print("seekling chat — empty line or Ctrl-D to quit, /reset to start over")
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            return
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        answer, thinking = "", False
        try:
            for d in engine.stream(history, params):
                if d.reasoning:
                    if not thinking:
                        print("\033[2m[thinking] ", end="")
                        thinking = True
                    print(d.reasoning, end="", flush=True)
                if d.text:
                    if thinking:
                        print("\033[0m\n")
                        thinking = False
                    print(d.text, end="", flush=True)
                    answer += d.text
                if d.error:  # this request failed inside the engine (finish_reason "error")
                    print(f"\n[error: {d.error}]")
        except KeyboardInterrupt:
            print("\n[stopped]")
        if thinking:
            print("\033[0m")
        history.append({"role": "assistant", "content": answer})


def cmd_export(args: argparse.Namespace) -> None:
    import shutil

    from seekling.model.load import load_pretrained

    if args.format == "gguf":
        from seekling.export import export_gguf

        if args.dtype or args.shard_gb:
            raise ValueError("--dtype and --shard-gb are for --format hf; a GGUF takes --outtype")
        modelfile = export_gguf(args.model, args.out, outtype=args.outtype, tokenizer_dir=args.tokenizer)
        print(f"exported {args.model} -> {args.out} ({args.outtype}); Ollama: ollama create NAME -f {modelfile}")
        return
    model = load_pretrained(args.model, dtype=args.dtype)
    model.save_pretrained(args.out, max_shard_bytes=int(args.shard_gb * 2**30) if args.shard_gb else None)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(args.model) / name).exists() and Path(args.model).resolve() != Path(args.out).resolve():
            shutil.copy(Path(args.model) / name, Path(args.out) / name)
    print(f"exported {args.model} -> {args.out} ({args.dtype or 'same dtype'})")


def cmd_report(args: argparse.Namespace) -> None:
    from seekling.report import write_report

    write_report(args.run)


# --- the parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from seekling.eval import add_eval_args, run_eval
    from seekling.speedrun import add_speedrun_args, run_speedrun

    parser = argparse.ArgumentParser(prog="seekling", description="A small, open, DeepSeek-style LLM system.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("speedrun", help="train a small reasoning model from scratch: data -> ... -> report")
    add_speedrun_args(p)
    p.set_defaults(fn=run_speedrun)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with the DeepSeek-R1 chat tokens")
    p.add_argument("--out", required=True)
    p.add_argument("--input", nargs="*", help=".txt/.jsonl/.parquet files (default: the built-in task corpus)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--corpus-per-task", type=int, default=5000)
    p.set_defaults(fn=cmd_tokenizer)

    p = sub.add_parser("data", help="tokenize .txt/.jsonl/.parquet files into token shards for pretraining")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("pretrain", help="pretrain a model on token shards")
    p.add_argument("--data", required=True, help="shard folder from `seekling data`")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small)")
    p.add_argument("--init", default=None, help="continue from this model directory instead of a fresh model")
    add_train_flags(p, lr=3e-3)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on reasoning traces (loss on the assistant only)")
    p.add_argument("--model", required=True, help="model directory to start from (with its tokenizer)")
    p.add_argument("--traces", nargs="*", help="JSONL from `seekling distill collect` (default: task traces)")
    p.add_argument("--only-correct", action="store_true", help="keep only verified-correct traces")
    p.add_argument("--levels", nargs="*", type=int, default=[1, 2], help="task levels (without --traces)")
    p.add_argument("--per-level", type=int, default=2000, help="problems per task and level (without --traces)")
    p.add_argument("--truncate", action="store_true", help="truncate long samples instead of dropping them")
    add_train_flags(p, lr=1e-3)
    p.set_defaults(fn=cmd_sft)

    from seekling.train.grpo import add_rl_args, run_rl

    p = sub.add_parser("rl", help="GRPO on verifiable rewards (R1 / R1-Zero recipes)")
    add_rl_args(p)
    p.set_defaults(fn=run_rl)

    p = sub.add_parser("distill", help="distillation: harvest a teacher's traces, or distil a local teacher's logits")
    dsub = p.add_subparsers(dest="distill_command", required=True, metavar="MODE")
    from seekling.train.collect import add_collect_args, run_collect

    q = dsub.add_parser("collect", help="harvest reasoning traces from an OpenAI-compatible teacher")
    add_collect_args(q)
    q.set_defaults(fn=run_collect)
    from seekling.train.distill import add_logits_args, run_logits

    q = dsub.add_parser("logits", help="knowledge distillation from a local teacher's logits (KL)")
    add_logits_args(q)
    q.set_defaults(fn=run_logits)

    p = sub.add_parser("eval", help="held-out evaluation: greedy, pass@1, maj@k per task and level")
    add_eval_args(p)
    p.set_defaults(fn=run_eval)

    p = sub.add_parser("sample", help="generate answers to a few prompts")
    _sampling_flags(p)
    p.add_argument("--prompt", nargs="*", help="questions (default: a sample one)")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    _sampling_flags(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(fn=cmd_chat)

    from seekling.serve import add_serve_args, run_serve

    p = sub.add_parser("serve", help="OpenAI-compatible API + chat web app (binds 127.0.0.1)")
    add_serve_args(p)
    p.set_defaults(fn=run_serve)

    p = sub.add_parser("export", help="re-save a model in the Hugging Face layout (optionally bf16 / sharded), "
                                      "or as a GGUF for llama.cpp / Ollama (with a Modelfile beside it)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="a directory (hf) or a .gguf file (gguf)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf")
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF tensor type")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for the GGUF (default: --model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--shard-gb", type=float, default=None, help="shard size in GiB (default: one file)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="(re)write a speedrun's report.md and plots")
    p.add_argument("--run", required=True)
    p.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, ValueError, MemoryError, DiskFull) as e:  # bad input, no space: a clear message
        print(f"seekling {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""`seekling distill collect`: harvest reasoning traces from a teacher's OpenAI-compatible API.

One request per (prompt, sample) to `POST {base_url}/chat/completions`, `concurrency` at a time.
Each answer becomes one JSON line in `--out`, written by the event loop right after the request
returns (flush + fsync), so a kill loses at most the requests in flight. Record ids are
`{prompt_id}#{sample_index}`: a restart reads the file back (cutting a torn last line), skips
the ids already there and asks only for the rest. With `--only-correct` the samples the verifier
rejects go to a sidecar `<out>.rejected.jsonl`, so a restart doesn't pay for them twice.

Retries: 408/409/429, 5xx, connection errors, timeouts and malformed answers are retried with
exponential backoff + jitter, waiting at least what a `Retry-After` header asks; other 4xx
(a bad key, a bad request) would fail again, so they are recorded as failed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from seekling.data import iter_jsonl

RETRY_STATUS = {408, 409, 429}  # plus every 5xx
CORRECT = 1.0  # a verifier score at or above this counts as a verified-correct answer
# DeepSeek's advice for prompting R1 on math; the task verifiers read the last \boxed{} answer.
TASK_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Prompt:
    id: str
    messages: list[dict]
    problem: Any = None  # a seekling.tasks Problem when the prompt comes from a task family


class RequestFailed(Exception):
    """A request that will not be retried (any more)."""


# ---------------------------------------------------------------------------------------------
# Reading and writing trace files


def rejected_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".rejected.jsonl")


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of a JSONL file. A last line without its newline is a write torn by a kill:
    it is ignored, and with `repair` cut off the file so that appends start on a clean line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        if repair:
            os.truncate(path, cut)
            print(f"[collect] {path}: cut a torn last line ({len(data) - cut} bytes)", flush=True)
        data = data[:cut]
    records = []
    for lineno, record in iter_jsonl(path, data.decode("utf-8")):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}:{lineno}: a record must be a JSON object with an 'id'")
        records.append(record)
    return records


def load_traces(path: str | Path, only_correct: bool = False) -> list[list[dict]]:
    """Trace records -> chat samples for SFT: the prompt messages followed by
    `{"role": "assistant", "content": ..., "reasoning_content": ...}`. With `only_correct`, only
    records a verifier scored as correct (records without a score are left out)."""
    samples = []
    for r in read_records(path):
        if only_correct and (r.get("score") is None or r["score"] < CORRECT):
            continue
        answer = {"role": "assistant", "content": r["content"], "reasoning_content": r["reasoning_content"]}
        samples.append([*r["messages"], answer])
    return samples


def read_prompts(path: str | Path) -> list[Prompt]:
    """A prompts file: one `{"id": ..., "messages": [...]}` or `{"id": ..., "prompt": "..."}` a line."""
    prompts, seen = [], set()
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{where}: each line needs an 'id' (record ids and resuming depend on it)")
        pid = str(row["id"])
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m
                                                         for m in messages):
                raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        elif isinstance(row.get("prompt"), str):
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError(f"{where}: needs 'messages' (a list) or 'prompt' (a string)")
        prompts.append(Prompt(pid, messages))
    return prompts


def task_prompts(task: str, count: int, difficulty: int | None = None, seed: int = 0) -> list[Prompt]:
    """Training problems of a built-in task family as prompts (never the held-out split: traces
    are for training). The id hashes the question, so it names the problem itself whatever the
    order or the flags that produced it; a repeated question is asked once."""
    from seekling.tasks import TASKS, sample_problems

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    prompts, seen = [], set()
    for p in sample_problems(task, count, split="train", difficulty=difficulty, seed=seed):
        pid = f"{task}-{hashlib.sha1(p.question.encode()).hexdigest()[:12]}"
        if pid not in seen:
            seen.add(pid)
            prompts.append(Prompt(pid, [{"role": "user", "content": p.question}], problem=p))
    if len(prompts) < count:
        print(f"[collect] {task}: {count - len(prompts)} repeated questions asked once", flush=True)
    return prompts


def with_instruction(messages: list[dict], instruction: str | None) -> list[dict]:
    """The messages with `instruction` appended to the last user message (a copy)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not instruction or not users:
        return messages
    last = users[-1]
    return [*messages[:last], {**messages[last], "content": f"{messages[last]['content']}\n\n{instruction}"},
            *messages[last + 1:]]


def score_task(problem: Any, content: str) -> float:
    from seekling.tasks import TASKS

    return float(TASKS[problem.task].score(problem, content))


# ---------------------------------------------------------------------------------------------
# Talking to the teacher


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds to wait: either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, content) of an answer. DeepSeek's API returns `reasoning_content` beside
    `content` (some servers call it `reasoning`); servers without a reasoning parser leave
    `<think>…</think>` in the content, and R1's template opens the think block in the prompt,
    so only `</think>` may be there. A think block never closed (cut by max_tokens) is all
    reasoning."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        return reasoning, content
    head = content.lstrip()
    if "</think>" in content:
        reasoning, _, content = content.partition("</think>")
        return reasoning.replace("<think>", "", 1).strip(), content.lstrip()
    if head.startswith("<think>"):
        return head[len("<think>"):].strip(), ""
    return "", content


async def post_with_retries(client: httpx.AsyncClient, url: str, payload: dict, headers: dict,
                            timeout: float, max_retries: int, backoff_base: float,
                            backoff_max: float, stats: dict) -> dict:
    """The JSON body of a successful chat completion (with at least one choice)."""
    error = ""
    for attempt in range(max_retries + 1):
        retry_after = None
        try:
            # wait_for bounds the whole request: httpx's timeouts are per read, and a server
            # that trickles bytes would never trip them.
            resp = await asyncio.wait_for(client.post(url, json=payload, headers=headers), timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            error = f"no answer within {timeout:g}s"
        except httpx.TransportError as e:
            error = f"{type(e).__name__}: {e}"
        else:
            status = resp.status_code
            if resp.is_success:
                try:
                    body = resp.json()
                    body["choices"][0]["message"]
                    return body
                except (ValueError, KeyError, IndexError, TypeError):
                    error = f"malformed answer (HTTP {status}): {resp.text[:200]!r}"
            elif status in RETRY_STATUS or status >= 500:
                error = f"HTTP {status}: {resp.text[:200]}"
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            else:
                raise RequestFailed(f"HTTP {status} (not retried): {resp.text[:200]}")
        if attempt == max_retries:
            break
        stats["retried"] += 1
        # Exponential backoff with "equal jitter": half fixed, half random, so that many workers
        # hit by the same outage don't come back in lockstep.
        backoff = min(backoff_max, backoff_base * 2**attempt)
        delay = max(retry_after or 0.0, backoff / 2 + random.uniform(0, backoff / 2))
        await asyncio.sleep(delay)
    raise RequestFailed(f"gave up after {max_retries + 1} attempts: {error}")


# ---------------------------------------------------------------------------------------------
# The collection loop


def collect(prompts: list[Prompt], out: str | Path, *, base_url: str, model: str, n: int = 1,
            concurrency: int = 8, api_key: str | None = None, temperature: float = 0.6,
            max_tokens: int = 4096, timeout: float = 600.0, max_retries: int = 8,
            only_correct: bool = False, score: Callable[[Any, str], float] | None = None,
            instruction: str | None = None, backoff_base: float = 1.0, backoff_max: float = 60.0) -> dict:
    """Ask the teacher for `n` samples of every prompt and append them to `out` (JSONL),
    skipping those already there. `score(problem, content) -> float` verifies the answers of
    prompts that carry a problem. `instruction` is appended to the last user message sent to
    the teacher only: the records keep the prompt as the student will see it. Returns (and
    prints) a summary."""
    if n < 1 or concurrency < 1 or max_retries < 0 or timeout <= 0:
        raise ValueError("n and concurrency must be >= 1, max_retries >= 0 and timeout > 0")
    if only_correct and score is None:
        raise ValueError("only_correct needs a verifier: give `score` (on the command line: use --task)")
    if only_correct and any(p.problem is None for p in prompts):
        raise ValueError("only_correct needs every prompt to carry a problem to verify")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_records(out, repair=True)}
    done |= {r["id"] for r in read_records(rejected_path(out), repair=True)}
    todo = [(p, i) for p in prompts for i in range(n) if f"{p.id}#{i}" not in done]
    print(f"[collect] {len(prompts)} prompts x {n} samples: {len(prompts) * n - len(todo)} already in {out}, "
          f"{len(todo)} to ask {model} at {base_url}", flush=True)
    request = dict(url=base_url.rstrip("/") + "/chat/completions", model=model, temperature=temperature,
                   max_tokens=max_tokens, timeout=timeout, max_retries=max_retries, backoff_base=backoff_base,
                   backoff_max=backoff_max, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    collector = Collector(todo, out, len(prompts) * n, request, concurrency, only_correct, score, instruction)
    stats = collector.run()
    print("[collect] done: " + ", ".join(f"{k} {v}" for k, v in stats.items()), flush=True)
    if stats["failed"] or stats["not_attempted"]:
        print(f"[collect] {stats['failed'] + stats['not_attempted']} samples missing; run the same command "
              "again to ask for them", flush=True)
    return stats


class Collector:
    """One collection: `concurrency` workers take (prompt, sample index) pairs off a queue, ask the teacher and
    write each answer as it comes (accepted to `out`, rejected by the verifier to its sidecar)."""

    def __init__(self, todo: list[tuple[Prompt, int]], out: Path, total: int, request: dict, concurrency: int,
                 only_correct: bool, score: Callable[[Any, str], float] | None, instruction: str | None):
        self.todo, self.out, self.request, self.concurrency = todo, out, request, concurrency
        self.only_correct, self.score, self.instruction = only_correct, score, instruction
        self.stats = {"total": total, "skipped": total - len(todo), "accepted": 0, "rejected": 0, "retried": 0,
                      "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0,
                      "not_attempted": 0, "wall_time_s": 0.0}
        self.queue = list(reversed(todo))  # workers pop from the end: prompts go out in file order
        # A teacher that is down or refuses our key fails every request: stop after this many failures
        # in a row instead of spending hours of backoff on each remaining sample.
        self.max_failures_in_a_row, self.failures_in_a_row = max(10, 2 * concurrency), 0
        self.files: dict[Path, Any] = {}

    def run(self) -> dict:
        self.t0 = self.last_log = time.monotonic()
        self.files = {self.out: open(self.out, "a", encoding="utf-8")}
        if self.only_correct:
            self.files[rejected_path(self.out)] = open(rejected_path(self.out), "a", encoding="utf-8")
        try:
            asyncio.run(self.run_workers())
        finally:
            for f in self.files.values():
                f.close()
        self.stats["wall_time_s"] = round(time.monotonic() - self.t0, 3)
        return self.stats

    async def run_workers(self) -> None:
        c = self.concurrency
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        # The client's timeout is a backstop; the real per-request deadline is in post_with_retries.
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.request["timeout"]), limits=limits) as client:
            await asyncio.gather(*(self.worker(client) for _ in range(min(c, max(1, len(self.todo))))))

    def write(self, path: Path, record: dict) -> None:
        # Called from the event loop only, so records never interleave; fsync makes each one
        # survive a kill or a power cut the moment it is counted.
        f = self.files[path]
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def progress(self) -> None:
        stats, now = self.stats, time.monotonic()
        finished = stats["accepted"] + stats["rejected"] + stats["failed"] + stats["not_attempted"]
        if now - self.last_log < 5.0 and finished < len(self.todo):
            return
        self.last_log = now
        rate = finished / max(now - self.t0, 1e-9)
        eta = (len(self.todo) - finished) / rate if rate > 0 else float("inf")
        print(f"[collect] {finished}/{len(self.todo)} accepted {stats['accepted']} rejected {stats['rejected']} "
              f"failed {stats['failed']} retried {stats['retried']} | {rate:.2f} samples/s, "
              f"ETA {eta:.0f}s", flush=True)

    async def worker(self, client: httpx.AsyncClient) -> None:
        r = self.request
        while self.queue:
            prompt, index = self.queue.pop()
            payload = {"model": r["model"], "messages": with_instruction(prompt.messages, self.instruction),
                       "temperature": r["temperature"], "max_tokens": r["max_tokens"], "stream": False}
            try:
                body = await post_with_retries(client, r["url"], payload, r["headers"], r["timeout"],
                                               r["max_retries"], r["backoff_base"], r["backoff_max"], self.stats)
            except RequestFailed as e:
                self.failed(f"{prompt.id}#{index}", e)
            else:
                self.failures_in_a_row = 0
                self.keep(prompt, index, body)
            self.progress()

    def failed(self, rid: str, error: Exception) -> None:
        self.stats["failed"] += 1
        self.failures_in_a_row += 1
        print(f"[collect] {rid} failed: {error}", flush=True)
        if self.failures_in_a_row >= self.max_failures_in_a_row and self.queue:
            self.stats["not_attempted"] = len(self.queue)
            self.queue.clear()
            print(f"[collect] {self.failures_in_a_row} samples failed in a row: stopping; the "
                  f"{self.stats['not_attempted']} not yet asked are left for a rerun", flush=True)

    def keep(self, prompt: Prompt, index: int, body: dict) -> None:
        """Record one answer: its reasoning and content, usage, and the verifier's score."""
        choice = body["choices"][0]
        reasoning, content = split_reasoning(choice["message"])
        usage = body.get("usage") or {}
        record = {"id": f"{prompt.id}#{index}", "prompt_id": prompt.id, "sample_index": index,
                  "messages": prompt.messages, "reasoning_content": reasoning, "content": content,
                  "finish_reason": choice.get("finish_reason"), "usage": usage,
                  "model": body.get("model") or self.request["model"]}
        if self.instruction:
            record["instruction"] = self.instruction
        if prompt.problem is not None:
            p = prompt.problem
            record.update(task=p.task, difficulty=p.difficulty, answer=p.answer,
                          score=self.score(p, content) if self.score else None)
        stats = self.stats
        stats["prompt_tokens"] += usage.get("prompt_tokens") or 0
        stats["completion_tokens"] += usage.get("completion_tokens") or 0
        details = usage.get("completion_tokens_details") or {}
        stats["reasoning_tokens"] += details.get("reasoning_tokens") or usage.get("reasoning_tokens") or 0
        if self.only_correct and record["score"] < CORRECT:
            stats["rejected"] += 1
            self.write(rejected_path(self.out), record)
        else:
            stats["accepted"] += 1
            self.write(self.out, record)


# ---------------------------------------------------------------------------------------------
# Command line (wired as `seekling distill collect`)


def add_collect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="the teacher's OpenAI-compatible API, e.g. .../v1")
    parser.add_argument("--model", required=True, help="the teacher's model name")
    parser.add_argument("--out", required=True, help="traces JSONL (appended to; a rerun resumes)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help='JSONL, one {"id", "messages"} or {"id", "prompt"} per line')
    src.add_argument("--task", help="a built-in task family (seekling.tasks) to draw problems from")
    parser.add_argument("--count", type=int, default=100, help="problems to draw with --task")
    parser.add_argument("--difficulty", type=int, default=None, help="task difficulty (default: mixed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (never pass a key as a flag)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one request")
    parser.add_argument("--max-retries", type=int, default=8)
    parser.add_argument("--backoff-base", type=float, default=1.0, help="first retry waits about this (s)")
    parser.add_argument("--instruction", default=None,
                        help="appended to each prompt sent to the teacher, not recorded in the prompt "
                             "(default with --task: DeepSeek's 'put your final answer within \\boxed{}'; "
                             "'' for none)")
    parser.add_argument("--only-correct", action="store_true",
                        help="rejection sampling: keep only answers the task's verifier accepts")


def run_collect(args: argparse.Namespace) -> dict:
    api_key = os.environ.get(args.api_key_env)
    if not api_key:
        print(f"[collect] ${args.api_key_env} is not set: sending no Authorization header", flush=True)
    if args.prompts:
        if args.only_correct:
            raise SystemExit("--only-correct needs a verifier: use --task instead of --prompts")
        prompts, score, instruction = read_prompts(args.prompts), None, args.instruction
    else:
        prompts = task_prompts(args.task, args.count, args.difficulty, args.seed)
        score = score_task
        instruction = TASK_INSTRUCTION if args.instruction is None else args.instruction
    return collect(prompts, args.out, base_url=args.base_url, model=args.model, n=args.n,
                   concurrency=args.concurrency, api_key=api_key, temperature=args.temperature,
                   max_tokens=args.max_tokens, timeout=args.timeout, max_retries=args.max_retries,
                   only_correct=args.only_correct, score=score, instruction=instruction,
                   backoff_base=args.backoff_base)

"""`seekling distill collect` against a fake teacher: a tiny OpenAI-style HTTP server on 127.0.0.1
that injects faults (429 + Retry-After, 5xx, hangs, malformed JSON, 401, think tags in content)."""

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
import types
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from seekling.train.collect import (
    TASK_INSTRUCTION,
    Prompt,
    add_collect_args,
    collect,
    load_traces,
    parse_retry_after,
    read_prompts,
    read_records,
    rejected_path,
    run_collect,
    split_reasoning,
)

REPO = Path(__file__).resolve().parents[1]
FAST = dict(backoff_base=0.05, backoff_max=0.2)


def teacher_answer(prompt: str) -> tuple[str, str]:
    """(reasoning, answer) of the fake teacher: sums "What is a + b?", wrong whenever a is odd."""
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt)
    if not m:
        return f"reasoning about {prompt}", f"answer to {prompt}"
    a, b = int(m[1]), int(m[2])
    return f"Adding {a} and {b}.", f"The answer is {a + b + a % 2}."


class FakeTeacher:
    """`plan[prompt]` lists the fault to inject on each successive request for that prompt
    ("429", "500", "hang", "malformed", "nochoices", "think", "401"); then it answers normally."""

    def __init__(self, plan: dict | None = None, delay: float = 0.0):
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.delay = delay
        self.log: list[tuple[float, str, str]] = []  # (time, prompt, action) per request
        self.auth: list[str | None] = []
        self.answers: dict[str, tuple[str, str]] = {}  # question -> (reasoning, answer), else teacher_answer
        self.lock = threading.Lock()
        self.release = threading.Event()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with teacher.lock:
                    todo = teacher.plan.get(prompt, [])
                    action = todo.pop(0) if todo else "ok"
                    teacher.log.append((time.monotonic(), prompt, action))
                    teacher.auth.append(self.headers.get("Authorization"))
                time.sleep(teacher.delay)
                try:
                    teacher.respond(self, body, prompt, action)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (hang)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def respond(self, h: BaseHTTPRequestHandler, body: dict, prompt: str, action: str) -> None:
        question = prompt.split("\n\n")[0]  # without an instruction the client appended
        reasoning, answer = self.answers.get(question) or teacher_answer(question)
        message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        status, headers = 200, {}
        if action == "hang":
            self.release.wait(5.0)
        if action == "think":
            message = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}
        payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                   "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                             "completion_tokens_details": {"reasoning_tokens": 15}}}
        if action == "429":
            status, headers, payload = 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
        elif action == "500":
            status, payload = 500, {"error": {"message": "boom"}}
        elif action == "401":
            status, payload = 401, {"error": {"message": "bad key"}}
        elif action == "nochoices":
            payload = {"id": "x", "choices": []}
        data = b'{"choices": [{"mess' if action == "malformed" else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def requests_for(self, prompt: str) -> list[tuple[float, str]]:
        return [(t, a) for t, p, a in self.log if p == prompt]


@pytest.fixture
def teacher():
    teachers = []

    def start(plan=None, delay=0.0):
        t = FakeTeacher(plan, delay)
        t.thread.start()
        teachers.append(t)
        return t

    yield start
    for t in teachers:
        t.release.set()
        t.server.shutdown()
        t.server.server_close()


def lines_of(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------


def test_split_reasoning():
    assert split_reasoning({"content": "42", "reasoning_content": "think"}) == ("think", "42")
    assert split_reasoning({"content": "42", "reasoning": "think"}) == ("think", "42")
    assert split_reasoning({"content": "<think>\nhmm\n</think>\n\n42"}) == ("hmm", "42")
    # R1's template opens <think> in the prompt, so the completion only closes it.
    assert split_reasoning({"content": "hmm\n</think>\n\n42"}) == ("hmm", "42")
    assert split_reasoning({"content": "<think>\ncut off by max_to"}) == ("cut off by max_to", "")
    assert split_reasoning({"content": "just 42"}) == ("", "just 42")
    assert split_reasoning({"content": None}) == ("", "")


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    wait = parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert 28.0 <= wait <= 31.0
    assert parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_read_prompts(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": 1, "prompt": "hi"}\n\n'
                    '{"id": "b", "messages": [{"role": "user", "content": "yo"}]}\n')
    prompts = read_prompts(good)
    assert [(p.id, p.messages) for p in prompts] == [
        ("1", [{"role": "user", "content": "hi"}]), ("b", [{"role": "user", "content": "yo"}])]
    for text, error in [('{"prompt": "hi"}', r":1: each line needs an 'id'"),
                        ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}', r":2: duplicate id '1'"),
                        ('{"id": 1, "messages": "hi"}', r":1: 'messages' must be a list"),
                        ('{"id": 1}', r":1: needs 'messages'"),
                        ("{oops", r":1: not JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=error):
            read_prompts(bad)


def test_faults_retries_and_reasoning(teacher, tmp_path):
    plan = {"p1": ["429"], "p2": ["500", "500"], "p3": ["hang"], "p4": ["malformed", "nochoices"],
            "p5": ["think"], "p6": ["401"], "p7": ["500"] * 4}
    t = teacher(plan)
    out = tmp_path / "traces.jsonl"
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": f"p{i}"}]) for i in range(8)]
    stats = collect(prompts, out, base_url=t.url, model="teacher-r1", concurrency=4, timeout=0.5,
                    max_retries=3, **FAST)

    records = lines_of(out)
    ids = [r["id"] for r in records]
    assert sorted(ids) == [f"p{i}#0" for i in (0, 1, 2, 3, 4, 5)]  # once each; p6 (401), p7 failed
    for r in records:
        prompt = r["messages"][-1]["content"]
        assert (r["reasoning_content"], r["content"]) == teacher_answer(prompt)
        assert r["model"] == "teacher-r1" and r["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == 20 and r["prompt_id"] == prompt and r["sample_index"] == 0
    # retried: 429 once, 500 twice, hang once, malformed + no choices, and p7's three retries
    assert stats["retried"] == 1 + 2 + 1 + 2 + 3
    assert (stats["accepted"], stats["failed"], stats["rejected"]) == (6, 2, 0)
    assert (stats["prompt_tokens"], stats["completion_tokens"], stats["reasoning_tokens"]) == (60, 120, 90)
    # the 401 was asked once and never again; p7 max_retries + 1 times
    assert [a for _, a in t.requests_for("p6")] == ["401"]
    assert len(t.requests_for("p7")) == 4
    # Retry-After: 1 was honoured; the hung request was abandoned after the 0.5 s timeout
    (t429, _), (t_next, _) = t.requests_for("p1")
    assert t_next - t429 >= 1.0
    (t_hang, _), (t_retry, _) = t.requests_for("p3")
    assert 0.45 <= t_retry - t_hang < 5.0  # the hung request is held 5 s by the server

    # A rerun asks only for what failed (p6, p7 now answer: their faults are used up), duplicating nothing.
    stats2 = collect(prompts, out, base_url=t.url, model="teacher-r1", concurrency=4, timeout=0.5,
                     max_retries=3, **FAST)
    assert (stats2["skipped"], stats2["accepted"]) == (6, 2)
    assert sorted(r["id"] for r in lines_of(out)) == [f"p{i}#0" for i in range(8)]


class FakeProblem:
    def __init__(self, task, difficulty, question, answer, trace):
        self.task, self.difficulty, self.question, self.answer, self.trace = (
            task, difficulty, question, answer, trace)


def fake_tasks_module() -> types.ModuleType:
    """A stand-in for seekling.tasks with its interface: sample_problems and TASKS[task].score."""
    def sample_problems(task, n, split="train", difficulty=None, seed=0):
        b = 100 + seed
        return [FakeProblem(task, difficulty or 1, f"What is {a} + {b}?", a + b, f"{a}+{b}={a + b}")
                for a in range(n)]

    def score(problem, completion):
        numbers = re.findall(r"-?\d+", completion)
        return float(bool(numbers) and int(numbers[-1]) == problem.answer)

    module = types.ModuleType("seekling.tasks")
    module.sample_problems = sample_problems
    module.TASKS = {"add": types.SimpleNamespace(score=score)}
    return module


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_collect_args(parser)
    return parser.parse_args(list(argv))


def test_task_only_correct_cli(teacher, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "seekling.tasks", fake_tasks_module())
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    t = teacher()
    out = tmp_path / "traces.jsonl"
    args = cli("--base-url", t.url, "--model", "r1", "--out", str(out), "--task", "add", "--count", "6",
               "--n", "2", "--difficulty", "3", "--only-correct", "--api-key-env", "TEACHER_KEY",
               "--backoff-base", "0.05", "--concurrency", "3")
    stats = run_collect(args)
    assert (stats["accepted"], stats["rejected"], stats["failed"]) == (6, 6, 0)
    assert set(t.auth) == {"Bearer sk-test"} and len(t.log) == 12
    # the teacher is told how to write the answer; the records keep the bare question for the student
    assert all(prompt.endswith("\n\n" + TASK_INSTRUCTION) for _, prompt, _ in t.log)

    kept, rejected = lines_of(out), lines_of(rejected_path(out))
    assert len({r["id"] for r in kept}) == len(kept) == 6
    for r in kept:  # a = 0, 2, 4: the teacher got them right
        a = int(re.match(r"What is (\d+)", r["messages"][0]["content"])[1])
        assert a % 2 == 0 and r["score"] == 1.0 and r["answer"] == a + 100
        assert r["task"] == "add" and r["difficulty"] == 3 and r["content"] == f"The answer is {a + 100}."
        assert r["messages"] == [{"role": "user", "content": f"What is {a} + 100?"}]
        assert r["instruction"] == TASK_INSTRUCTION
    assert sorted({r["sample_index"] for r in kept}) == [0, 1]
    assert all(r["score"] == 0.0 for r in rejected) and len({r["id"] for r in rejected}) == 6

    # Rejected samples are remembered: a rerun sends no request at all.
    stats2 = run_collect(args)
    assert (stats2["skipped"], stats2["accepted"], stats2["rejected"]) == (12, 0, 0) and len(t.log) == 12

    samples = load_traces(out, only_correct=True)
    assert len(samples) == 6
    assert samples[0][0]["role"] == "user" and samples[0][-1]["role"] == "assistant"
    assert samples[0][-1]["reasoning_content"].startswith("Adding")
    assert load_traces(rejected_path(out), only_correct=True) == []
    assert len(load_traces(rejected_path(out))) == 6


def test_dead_teacher_stops_early(teacher, tmp_path):
    """A teacher that refuses every request (a wrong key) is given up on after 10 failures in a row,
    not asked for all 50 samples; a rerun against a working teacher then completes the file."""
    prompts = [Prompt(f"d{i}", [{"role": "user", "content": f"d{i}"}]) for i in range(50)]
    t = teacher({f"d{i}": ["401"] for i in range(50)})
    out = tmp_path / "traces.jsonl"
    stats = collect(prompts, out, base_url=t.url, model="r1", concurrency=2, **FAST)
    assert stats["accepted"] == 0 and stats["retried"] == 0
    assert 10 <= stats["failed"] <= 11 and stats["failed"] + stats["not_attempted"] == 50
    assert len(t.log) == stats["failed"] and not out.read_text()
    t.plan.clear()
    stats = collect(prompts, out, base_url=t.url, model="r1", concurrency=2, **FAST)
    assert stats["accepted"] == 50
    assert sorted(r["id"] for r in lines_of(out)) == sorted(f"d{i}#0" for i in range(50))


def test_bad_arguments(tmp_path):
    prompts = [Prompt("a", [{"role": "user", "content": "hi"}])]
    with pytest.raises(ValueError, match="must start with http"):
        collect(prompts, tmp_path / "o.jsonl", base_url="localhost:8000/v1", model="m")
    with pytest.raises(ValueError, match="n and concurrency must be >= 1"):
        collect(prompts, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9", model="m", n=0)
    (tmp_path / "o.jsonl").write_text('{"id": "a#0"}\nnot json\n')
    with pytest.raises(ValueError, match=r"o.jsonl:2: invalid JSON"):
        collect(prompts, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9", model="m")
    with pytest.raises(ValueError, match="verifier"):
        collect(prompts, tmp_path / "o.jsonl", base_url="http://127.0.0.1:9", model="m", only_correct=True)
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    with pytest.raises(SystemExit, match="--only-correct needs a verifier"):
        run_collect(cli("--base-url", "http://127.0.0.1:9", "--model", "m", "--out",
                        str(tmp_path / "o.jsonl"), "--prompts", str(tmp_path / "p.jsonl"), "--only-correct"))


def test_kill_and_resume(teacher, tmp_path):
    t = teacher(delay=0.03)
    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "traces.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"q{i}"}) + "\n" for i in range(40)))
    # The child loads collect.py by path: `import seekling` would pull in torch, seconds of startup.
    code = ("import sys, argparse, importlib.util\n"
            "spec = importlib.util.spec_from_file_location('collect', sys.argv.pop(1))\n"
            "m = sys.modules['collect'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(m)\n"
            "p = argparse.ArgumentParser(); m.add_collect_args(p)\n"
            "m.run_collect(p.parse_args(sys.argv[1:]))\n")
    argv = ["--base-url", t.url, "--model", "r1", "--out", str(out), "--prompts", str(prompts_file),
            "--concurrency", "2"]
    proc = subprocess.Popen([sys.executable, "-c", code, str(REPO / "seekling/train/collect.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = out.read_text().splitlines(keepends=True)
    before = [line for line in before if line.endswith("\n")]
    assert 8 <= len(before) < 40
    with open(out, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"id": "q39#0", "messages": [{"role": "us')

    stats = collect(read_prompts(prompts_file), out, base_url=t.url, model="r1", concurrency=4, **FAST)
    after = out.read_text().splitlines(keepends=True)
    assert after[:len(before)] == before  # nothing written before the kill was lost or rewritten
    records = lines_of(out)
    assert sorted(r["id"] for r in records) == sorted(f"q{i}#0" for i in range(40))
    assert stats["skipped"] == len(before) and stats["accepted"] == 40 - len(before)
    # the samples on disk before the kill were asked for once, never again
    for line in before:
        assert len(t.requests_for(json.loads(line)["messages"][-1]["content"])) == 1
    assert read_records(out) == records


def test_real_task_families(teacher, tmp_path):
    """Against the real seekling.tasks: a teacher that answers half the problems right in the tasks'
    own format; --only-correct keeps exactly those, and load_traces gives back the tasks' SFT messages."""
    tasks = pytest.importorskip("seekling.tasks")
    from seekling.train.collect import task_prompts

    t = teacher()
    for name in tasks.TASKS:
        prompts = task_prompts(name, 4, seed=3)
        for i, p in enumerate(prompts):
            problem = p.problem
            answer = problem.answer if i % 2 == 0 else "x"
            t.answers[problem.question] = (problem.trace, tasks.format_answer(answer))
        out = tmp_path / f"{name}.jsonl"
        stats = run_collect(cli("--base-url", t.url, "--model", "r1", "--out", str(out), "--task", name,
                                "--count", "4", "--seed", "3", "--only-correct", "--backoff-base", "0.05"))
        right = [p.problem for i, p in enumerate(prompts) if i % 2 == 0]
        assert (stats["accepted"], stats["rejected"]) == (len(right), len(prompts) - len(right))
        assert stats["failed"] == 0
        records = sorted(lines_of(out), key=lambda r: r["messages"][0]["content"])
        right.sort(key=lambda p: p.question)
        assert [(r["task"], r["difficulty"], r["answer"], r["score"]) for r in records] == [
            (name, p.difficulty, p.answer, 1.0) for p in right]
        assert sorted(load_traces(out, only_correct=True), key=lambda m: m[0]["content"]) == [
            p.messages(with_trace=True) for p in right]

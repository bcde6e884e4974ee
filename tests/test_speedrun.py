"""The main job end to end: `seekling speedrun --preset smoke --seeds 2` through the real command, its
results.json contract, the replicate seed and the intervals, the report card, resuming, and the command's
--help and error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import seekling
from seekling.report import rl_target_accuracy, run_intervals

COMMANDS = ["speedrun", "tokenizer", "data", "pretrain", "sft", "rl", "distill", "eval", "sample", "chat", "serve",
            "export", "report"]


def seekling_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seekling.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun") / "smoke"
    proc = seekling_cli("speedrun", "--preset", "smoke", "--out", str(out), "--threads", "1", "--seeds", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_speedrun_writes_the_contract(smoke_run):
    out, stdout = smoke_run
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "smoke"
    assert 0 < results["wall_time_s"] < 600
    for stage in ("base", "sft", "sft_control", "rl"):
        r = results["stages"][stage]
        for key in ("greedy", "pass@1"):
            assert 0.0 <= r[key] <= 1.0
        assert set(r["by_task"]) == {"addition", "countdown", "multiplication", "word"}
        for task in r["by_task"].values():
            assert set(task["by_level"]) == {"1", "2", "3"}
            for cell in task["by_level"].values():
                assert cell["n"] == 3 and 0.0 <= cell["pass@1"] <= 1.0
    # every stage left a Hugging Face model directory with its tokenizer
    for stage in ("base", "sft", "sft_control", "rl"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (out / stage / name).exists(), (stage, name)
        assert not (out / stage / "checkpoints").exists()  # training state lives beside, not inside
    assert (out / "train_state" / "base" / "checkpoints" / "latest").exists()
    report = (out / "report.md").read_text()
    assert "Held-out accuracy" in report and "| addition | 3 |" in report
    for plot in ("accuracy.png", "loss.png", "rl.png", "expert_load.png"):
        assert (out / "plots" / plot).stat().st_size > 1000
    assert f"seekling chat --model {out / 'rl'}" in stdout
    # the RL target cells are recorded and the verdict is computed over them
    cells = [tuple(c) for c in results["rl"]["cells"]]
    assert cells and all(lv in (1, 2, 3) for _, lv in cells)
    assert rl_target_accuracy(results["stages"]["rl"], cells) is not None
    # the fixed measure (word problems levels 1-2, whatever RL trained) and the chat eval for every stage
    for stage in ("base", "sft", "sft_control", "rl"):
        fixed = results["fixed"][stage]
        assert fixed["n"] == 8 and set(fixed["scores"]["cell"]) == {"word/1", "word/2"}
        chat = results["chat"][stage]
        assert chat["n"] == 10 and 0.0 <= chat["pass"] <= 1.0 and chat["examples"]
    iv = results["intervals"]
    assert set(iv["fixed"]["pass@1"]) >= {"base", "sft", "sft_control", "rl", "rl-base", "rl-sft"}
    assert set(iv["chat"]) == {"base", "sft", "sft_control", "rl"}
    assert "The fixed measure: word 1, word 2" in report and "Does it know what it is?" in report


def test_replicate_seed_trains_seed_zero_steps_and_intervals_cover_both(smoke_run):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    rep = results["replicates"]["1"]
    # the replicate trains seed 0's step counts (load cannot change it), on seed 0's RL cells, from the one base
    assert rep["sft"]["step"] == results["sft"]["step"] and rep["sft"]["stopped"] == "max_steps"
    assert rep["rl"]["steps"] == results["rl"]["steps"] and rep["rl"]["cells"] == results["rl"]["cells"]
    assert rep["sft_control"]["step"] == results["sft_control"]["step"]
    assert rep["rl_cells_eval"]["base"] == results["rl_cells_eval"]["base"]
    for stage in ("sft", "rl", "sft_control"):
        assert (out / "seed1" / stage / "model.safetensors").exists()
        assert rep["stages"][stage]["scores"]["cell"] == results["stages"][stage]["scores"]["cell"]
    iv = results["intervals"]
    assert iv["seeds"] == 2
    rl_scores = [results["stages"]["rl"]["scores"]["pass@1"], rep["stages"]["rl"]["scores"]["pass@1"]]
    ci = iv["stages"]["rl"]["pass@1"]
    assert ci["seeds"] == 2 and ci["problems"] == 36
    assert ci["mean"] == pytest.approx(sum(map(sum, rl_scores)) / 72) and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert iv["stages"]["base"]["pass@1"]["seeds"] == 1  # one pretraining
    assert set(iv["rl_cells"]["pass@1"]) == {"base", "sft", "sft_control", "rl", "rl-sft", "rl-sft_control",
                                             "rl-base"}
    report = (out / "report.md").read_text()
    assert "over 2 seed(s)" in report and "RL − SFT: **" in report and "seed 1: sft" in report


def test_intervals_on_known_scores():
    """run_intervals on hand-made results: RL solves 20 more of 100 problems than SFT on both seeds."""
    def ev(solved: int) -> dict:
        scores = [1.0] * solved + [0.0] * (100 - solved)
        return {"pass@1": solved / 100, "scores": {"cell": ["word/2"] * 100, "pass@1": scores, "greedy": scores}}

    results = {"stages": {"base": ev(50)}, "rl_cells_eval": {"base": ev(50), "sft": ev(30), "sft_control": ev(25),
                                                              "rl": ev(50)},
               "replicates": {"1": {"stages": {}, "rl_cells_eval": {"base": ev(50), "sft": ev(40),
                                                                    "sft_control": ev(20), "rl": ev(60)}}}}
    iv = run_intervals(results)["rl_cells"]["pass@1"]
    assert iv["rl-sft"]["mean"] == pytest.approx(0.2) and iv["rl-sft"]["seeds"] == 2
    assert 0.0 < iv["rl-sft"]["lo"] < 0.2 < iv["rl-sft"]["hi"]
    assert iv["rl-base"]["mean"] == pytest.approx(0.05) and iv["rl-sft_control"]["mean"] == pytest.approx(0.325)
    assert iv["base"]["seeds"] == 1 and iv["base"]["mean"] == 0.5


def test_smoke_model_loads_and_generates(smoke_run):
    out, _ = smoke_run
    engine = seekling.Engine(str(out / "rl"))
    outs = engine.generate([[{"role": "user", "content": "What is 12 + 30?"}]],
                           seekling.SamplingParams(temperature=0, max_tokens=8))
    assert len(outs[0].token_ids) >= 1 and outs[0].finish_reason in ("stop", "length")


def test_rerun_resumes_instead_of_redoing(smoke_run):
    out, _ = smoke_run
    before = json.loads((out / "results.json").read_text())
    proc = seekling_cli("speedrun", "--preset", "smoke", "--out", str(out), "--threads", "1", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done already, skipping") == 21  # 12 stages + seed 1's 9
    after = json.loads((out / "results.json").read_text())
    assert after["stages"] == before["stages"]
    # a run directory of another preset is refused, not overwritten
    proc = seekling_cli("speedrun", "--preset", "default", "--out", str(out))
    assert proc.returncode == 2 and "smoke" in proc.stderr


def test_every_command_has_help():
    for command in COMMANDS:
        proc = seekling_cli(command, "--help", timeout=120)
        assert proc.returncode == 0 and "usage: seekling" in proc.stdout, command
    proc = seekling_cli("distill", "logits", "--help", timeout=120)
    assert proc.returncode == 0 and "--teacher" in proc.stdout


def test_bad_input_is_a_clear_error(tmp_path):
    proc = seekling_cli("eval", "--model", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    proc = seekling_cli("tokenizer", "--out", str(tmp_path / "tok"), "--input", str(bad), timeout=120)
    assert proc.returncode == 2 and "bad.jsonl:2" in proc.stderr


def test_interrupted_stage_is_not_marked_done(tmp_path):
    """Ctrl-C makes the trainer save and return; the speedrun must stop, and a re-run redo that stage."""
    from seekling.speedrun import Speedrun, stop_if_interrupted

    run = Speedrun(tmp_path / "run", "smoke")
    with pytest.raises(SystemExit, match="re-run the same command"):
        run.stage("sft", lambda: stop_if_interrupted({"stopped": "interrupted"}))
    assert "sft" not in run.results.get("done", [])
    run.stage("sft", lambda: stop_if_interrupted({"stopped": "time_budget"}))
    assert "sft" in json.loads((tmp_path / "run" / "results.json").read_text())["done"]


def test_sample_command_with_compile_prints_the_same_greedy_answer(smoke_run):
    out, _ = smoke_run
    args = ["sample", "--model", str(out / "rl"), "--temperature", "0", "--max-tokens", "12",
            "--prompt", "What is 12 + 30?"]
    plain, compiled = seekling_cli(*args), seekling_cli(*args, "--compile")
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert compiled.stdout == plain.stdout and "### What is 12 + 30?" in plain.stdout
    assert "compiling the decode graph" in compiled.stderr

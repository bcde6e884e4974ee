"""scripts/gpu_check.sh --cpu-dry-run: the GPU check's CPU-runnable parts at tiny sizes (data, a pretraining,
a one-process torchrun, the engine against transformers' generate, a short GRPO run), each reported in
its table. On a GPU machine the same script, without the flag, proves the CUDA path."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_dry_run(tmp_path):
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    table = (tmp_path / "gpu_check.md").read_text()
    assert run.returncode == 0, table + run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines() if line.startswith("| ")}
    for check in ("data", "pretrain", "torchrun_1proc", "engine_vs_hf", "grpo"):
        assert rows[check][0].strip() == "ok", (check, table)
    assert "fp32" in rows["pretrain"][1] and "tokens/s" in rows["pretrain"][1]
    assert "fsdp over gloo" in rows["torchrun_1proc"][1]  # a process group even for one process under torchrun
    assert "3/3" in rows["engine_vs_hf"][1]
    assert "2 steps" in rows["grpo"][1]

import json
import math
import os
import signal
import socket
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import seekling
from seekling.data import BatchLoader, PackedDataset, SFTDataset, write_shards
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.train import TrainConfig, lm_loss, lr_at, make_optimizers, train
from seekling.train.scaffold import saved_state
from seekling.train.trainer import newton_schulz

VOCAB = 64



def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(preset(
        "tiny", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Learnable documents: counting runs (t, t+1, t+2, ...) with random starts and lengths."""
    rng = np.random.default_rng(0)
    docs = [[2 + (s + i) % (VOCAB - 2) for i in range(rng.integers(4, 30))] for s in rng.integers(0, 60, 300)]
    path = tmp_path_factory.mktemp("shards")
    write_shards(docs, path, eos_id=1, vocab_size=VOCAB, shard_tokens=1000)
    return path


def cfg(**kw):
    return TrainConfig(**{"max_steps": 6, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "log_every": 1, **kw})


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_lr_schedules():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100)
    assert lr_at(c, 0, 0.0) == pytest.approx(0.1) and lr_at(c, 9, 0.09) == pytest.approx(1.0)
    assert lr_at(c, 50, 0.5) == pytest.approx(0.55) and lr_at(c, 100, 1.0) == pytest.approx(0.1)
    w = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, schedule="wsd")
    assert [lr_at(w, s, s / 100) for s in (20, 79, 90, 100)] == pytest.approx([1.0, 1.0, 0.55, 0.1])
    # GRPO's schedule is the same function: cosine from lr down to lr * min_lr_ratio
    from seekling.train.grpo import RLConfig

    r = RLConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    assert [lr_at(r, s, s / 100) for s in (0, 50, 100)] == pytest.approx([0.1, 0.55, 0.1])
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    g = torch.randn(48, 16) @ torch.diag(torch.logspace(-1, 0, 16))  # condition number 10
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    x = newton_schulz(g)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.3  # all singular values pulled near 1 (Muon's quintic is loose)
    assert F.cosine_similarity(x.flatten(), (u @ vt).flatten(), dim=0) > 0.95


def test_param_groups():
    model = tiny_model()
    adam, muon = make_optimizers(model, cfg(optimizer="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    assert muon_names and all(names[id(p)].endswith("weight") for p in muon.param_groups[0]["params"])
    assert not any("embed_tokens" in n or n.endswith("head.weight") for n in muon_names)
    no_decay = [names[id(p)] for p in adam.param_groups[1]["params"]]
    assert no_decay and all("norm" in n for n in no_decay) and adam.param_groups[1]["weight_decay"] == 0
    total = sum(len(g["params"]) for o in (adam, muon) for g in o.param_groups)
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_learns_and_writes_checkpoint(tmp_path, shards, optimizer, device):
    ds = PackedDataset(shards, 32)
    eval_batches = [next(BatchLoader(ds, 8, seed=99, rank=0, world_size=1))]
    model = tiny_model()
    out = tmp_path / "run" / "base"
    summary = train(model, BatchLoader(ds, 8, rank=0, world_size=1), cfg(max_steps=40, optimizer=optimizer, lr=3e-2,
                    eval_every=20, log_every=10, device=device), out, eval_batches=eval_batches)
    ls = losses(summary["history"])
    assert ls[-1] < 0.6 * ls[0], ls  # counting runs are easy: the loss must fall a lot in 40 steps
    evals = [h["eval_loss"] for h in summary["history"] if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert summary["step"] == 40 and summary["tokens"] == 40 * 8 * 32 and summary["stopped"] == "max_steps"

    # the model directory is a plain HF checkpoint; the training state is a sibling, not inside it
    assert not (out / "checkpoints").exists() and saved_state(tmp_path / "run" / "train_state" / "base")["step"] == 40
    loaded = seekling.load_pretrained(out)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == n2 and torch.equal(p.cpu(), p2), n
    lines = [json.loads(x) for x in (tmp_path / "run" / "train_state" / "base" / "metrics.jsonl").open()]
    assert lines == json.loads(json.dumps(summary["history"]))
    rec = lines[-2]
    assert {"loss", "lr", "tokens_per_s", "mfu", "ce_loss", "mtp_loss", "grad_norm"} <= set(rec)
    assert len(rec["expert_load_max_mean"]) == 2 and all(r >= 1.0 for r in rec["expert_load_max_mean"])


def test_interrupt_and_resume_is_exact(tmp_path, shards):
    ds = PackedDataset(shards, 16)
    c = cfg(max_steps=6, checkpoint_every=4, grad_accum=2)
    ref_model = tiny_model()
    ref = train(ref_model, BatchLoader(ds, 4, rank=0, world_size=1), c, tmp_path / "ref")

    calls = 0

    def ctrl_c_at_step_3(model, batch):  # Ctrl-C arrives in the middle of step 3
        nonlocal calls
        calls += 1
        if calls == 5:
            signal.raise_signal(signal.SIGINT)
        return lm_loss(model, batch)

    prev = signal.getsignal(signal.SIGINT)
    part = train(tiny_model(), BatchLoader(ds, 4, rank=0, world_size=1), c, tmp_path / "run", loss_fn=ctrl_c_at_step_3)
    assert part["stopped"] == "interrupted" and part["step"] == 3 and calls == 6  # the step was finished
    assert signal.getsignal(signal.SIGINT) is prev  # our handler is removed again

    # a fresh process would build a differently-initialised model and a fresh loader: resume restores both
    resumed_model = tiny_model(seed=123)
    rest = train(resumed_model, BatchLoader(ds, 4, rank=0, world_size=1), c, tmp_path / "run", resume=True)
    assert rest["step"] == 6
    assert losses(rest["history"]) == losses(ref["history"])  # bit for bit
    for (n, p), p2 in zip(ref_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(p, p2), n
    steps = [json.loads(x)["step"] for x in (tmp_path / "train_state" / "run" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4, 5, 6]

    # a plain iterable (no cursor) resumes by skipping the batches already consumed
    loader = BatchLoader(ds, 4, rank=0, world_size=1)
    part = train(tiny_model(), (next(loader) for _ in range(6)), c, tmp_path / "gen")
    assert part["stopped"] == "data_exhausted" and part["step"] == 3
    rest = train(tiny_model(), BatchLoader(ds, 4, rank=0, world_size=1), c, tmp_path / "gen", resume=True)
    assert losses(rest["history"]) == losses(ref["history"])


def test_sft_batches_and_custom_loss(tmp_path):
    # SFT: the prompt (first 3 tokens) is masked; the answer repeats the prompt. A custom loss_fn
    # (as distillation passes) sees the batch and its metrics are logged.
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(64):
        q = rng.integers(2, VOCAB, 3).tolist()
        samples.append((q + q + [1], [0, 0, 0, 1, 1, 1, 1]))
    seen = []

    def loss_fn(model, batch):
        seen.append(batch["labels"].clone())
        loss, metrics = lm_loss(model, batch)
        return loss, {**metrics, "answer_tokens": float((batch["labels"] != -100).sum())}

    summary = train(tiny_model(), BatchLoader(SFTDataset(samples, 16, pad_id=0), 16, rank=0, world_size=1),
                    cfg(max_steps=30, lr=3e-2, log_every=5), tmp_path / "sft", loss_fn=loss_fn)
    assert all((lab[:, :3] == -100).all() and (lab[:, 3:] != -100).all() for lab in seen)
    assert summary["history"][-1]["answer_tokens"] == 16 * 4
    ls = losses(summary["history"])
    assert ls[-1] < ls[0] - 0.5


def test_time_budget_sigterm_and_state_dir_guard(tmp_path, shards):
    ds = PackedDataset(shards, 16)
    summary = train(tiny_model(), BatchLoader(ds, 2, rank=0, world_size=1),
                    cfg(max_steps=10_000, time_budget_s=0.3, warmup_steps=0), tmp_path / "timed")
    assert summary["stopped"] == "time_budget" and 1 < summary["step"] < 10_000
    assert summary["train_time_s"] >= 0.3
    # with a time budget the cosine follows the clock (by steps, 10_000 would keep it flat at lr)
    lrs = [h["lr"] for h in summary["history"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]

    calls = 0

    def sigterm_at_step_2(model, batch):  # what a launcher or a job scheduler sends
        nonlocal calls
        calls += 1
        if calls == 2:
            signal.raise_signal(signal.SIGTERM)
        return lm_loss(model, batch)

    summary = train(tiny_model(), BatchLoader(ds, 2, rank=0, world_size=1), cfg(), tmp_path / "term",
                    loss_fn=sigterm_at_step_2)
    assert summary["stopped"] == "interrupted" and summary["step"] == 2
    assert saved_state(tmp_path / "train_state" / "term")["step"] == 2
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train(tiny_model(), BatchLoader(ds, 2, rank=0, world_size=1), cfg(), tmp_path / "nan",
              loss_fn=lambda model, batch: (lm_loss(model, batch)[0] * float("nan"), {}))
    with pytest.raises(ValueError, match="inside the model directory"):
        train(tiny_model(), [], cfg(), tmp_path / "m", state_dir=tmp_path / "m" / "state")


def _ddp_worker(rank, world, port, shard_dir, out, result_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    loader = BatchLoader(PackedDataset(shard_dir, 16), 2, seed=5)  # rank / world from the environment
    model = tiny_model()
    summary = train(model, loader, cfg(max_steps=4, grad_accum=2, optimizer="muon"), out)
    if rank == 0:
        torch.save({"losses": losses(summary["history"]), "weights": model.state_dict()}, result_file)
    # Leave without interpreter teardown: gloo's threads racing C++ static destructors at exit have
    # aborted a finished worker ("terminate called without an active exception") in CI.
    sys.stdout.flush()
    os._exit(0)


def test_two_process_ddp_matches_one_process(tmp_path, shards):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(shards), str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")

    model = tiny_model()
    single = train(model, BatchLoader(PackedDataset(shards, 16), 4, seed=5, rank=0, world_size=1),
                   cfg(max_steps=4, grad_accum=2, optimizer="muon"), tmp_path / "single")
    assert losses(single["history"]) == pytest.approx(ddp["losses"], abs=1e-5)
    worst = max((p - ddp["weights"][n]).abs().max().item() for n, p in model.state_dict().items())
    assert worst < 1e-5
    # the expert biases moved (loads summed across ranks), identically to the one-process run
    bias = [n for n in ddp["weights"] if n.endswith("e_score_correction_bias")]
    assert bias and any(ddp["weights"][n].abs().sum() > 0 for n in bias)
    assert not math.isnan(single["loss"])


def test_training_code_has_no_long_functions():
    """One Loop (scaffold.py) runs every job; what a job supplies stays short (the issue's bar: under 80 lines)."""
    import ast
    from pathlib import Path

    import seekling.train

    long = []
    for path in Path(seekling.train.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long

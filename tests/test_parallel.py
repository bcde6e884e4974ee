"""Scaling out on CPU with gloo, two processes on 127.0.0.1: FSDP2 training against one process, kill and
resume (same world size, and 2 -> 1), the gathered Hugging Face checkpoint in transformers, expert
parallelism against the single-process MoE, and GRPO on sharded ranks. Each spawn runs several scenarios
(a spawn costs seconds of interpreter start-up and gloo set-up)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seekling
from seekling.data import BatchLoader, PackedDataset, write_shards
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.model.moe import MoE
from seekling.train import TrainConfig, lm_loss, train
from seekling.train.expert_parallel import apply_expert_parallel
from seekling.train.scaffold import saved_state

VOCAB = 64
STEPS = 6


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset(
        "tiny", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"max_steps": STEPS, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                          "grad_accum": 2, "checkpoint_every": 3, **kw})


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def loader(shards: Path, batch: int) -> BatchLoader:
    """Batch `batch` per rank; with 2 ranks at 2 each, the same global batches as 1 rank at 4."""
    return BatchLoader(PackedDataset(shards, 16), batch, seed=5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = [[2 + (s + i) % (VOCAB - 2) for i in range(rng.integers(4, 30))] for s in rng.integers(0, 60, 300)]
    path = tmp_path_factory.mktemp("shards")
    write_shards(docs, path, eos_id=1, vocab_size=VOCAB, shard_tokens=1000)
    return path


def spawn(scenario, tmp_path: Path, *args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, scenario, str(tmp_path), *args), nprocs=2)


def _worker(rank: int, port: int, scenario, tmp: str, *args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # one group for all the scenario's runs (train() then leaves it open)
    scenario(rank, Path(tmp), *args)
    dist.barrier()
    # Leave without interpreter teardown: gloo's threads racing C++ static destructors at exit have
    # aborted a finished worker in CI (see test_trainer's DDP test).
    sys.stdout.flush()
    os._exit(0)


def single(shards: Path, out: Path, **kw) -> tuple[dict, Transformer]:
    model = tiny_model()
    return train(model, BatchLoader(PackedDataset(shards, 16), 4, seed=5, rank=0, world_size=1), cfg(**kw), out), model


def assert_weights_close(directory: Path, model: Transformer, tol: float = 1e-5) -> None:
    saved = seekling.load_pretrained(directory).state_dict()
    ref = model.state_dict()
    assert saved.keys() == ref.keys()
    worst = max((saved[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < tol, worst


def test_settings_are_checked_before_anything_runs():
    from seekling.train.grpo import RLConfig
    from seekling.train.scaffold import setup

    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        setup("cpu", ep=2)  # a plain process has one rank
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="parallel"):
        RLConfig(parallel="tp")


# --- FSDP2: parity, kill and resume at 2 and at 1 rank, the HF checkpoint --------------------------------
def _fsdp_runs(rank: int, tmp: Path, shards: str) -> None:
    shards = Path(shards)
    full = train(tiny_model(), loader(shards, 2), cfg(parallel="fsdp"), tmp / "full")
    calls = 0

    def sigterm_in_step_3(model, batch):  # what a scheduler sends; rank 0 only: the ranks must agree to stop
        nonlocal calls
        calls += 1
        if calls == 5 and rank == 0:
            signal.raise_signal(signal.SIGTERM)
        return lm_loss(model, batch)

    part = train(tiny_model(), loader(shards, 2), cfg(parallel="fsdp"), tmp / "run", loss_fn=sigterm_in_step_3)
    if rank == 0:  # the state at the kill, for the one-process resume in the parent
        shutil.copytree(tmp / "train_state" / "run", tmp / "train_state" / "one")
    dist.barrier()
    rest = train(tiny_model(seed=7), loader(shards, 2), cfg(parallel="fsdp"), tmp / "run", resume=True)
    if rank == 0:
        (tmp / "fsdp.json").write_text(json.dumps({"full": losses(full["history"]), "stopped": part["stopped"],
                                                   "step": part["step"], "rest": losses(rest["history"])}))


def test_fsdp_matches_one_process_resumes_exactly_and_saves_hf(tmp_path, shards):
    spawn(_fsdp_runs, tmp_path, str(shards))
    got = json.loads((tmp_path / "fsdp.json").read_text())
    ref, ref_model = single(shards, tmp_path / "single")
    assert losses(ref["history"]) == pytest.approx(got["full"], abs=1e-5)
    assert_weights_close(tmp_path / "full", ref_model)  # rank 0 wrote the gathered weights

    # SIGTERM on rank 0 in step 3: both ranks finished the step, saved and stopped; the resume is exact
    assert got["stopped"] == "interrupted" and got["step"] == 3
    assert got["rest"] == got["full"]
    assert saved_state(tmp_path / "train_state" / "run")["step"] == STEPS

    # the FSDP checkpoint of step 3 resumes in one process (DCP reshards the model and the optimizer)
    one = tiny_model(seed=8)
    rest = train(one, BatchLoader(PackedDataset(shards, 16), 4, seed=5, rank=0, world_size=1), cfg(),
                 tmp_path / "one", resume=True)
    assert losses(rest["history"]) == pytest.approx(got["full"], abs=1e-5)
    worst = max((p - q).abs().max().item() for p, q in zip(one.parameters(), ref_model.parameters(), strict=True))
    assert worst < 1e-5

    # the model directory is a Hugging Face checkpoint: transformers gives the same logits
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    ids = torch.randint(2, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ref_model.eval()(ids).logits).abs().max().item() < 1e-4


# --- expert parallelism -----------------------------------------------------------------------------------
def moe_layer() -> MoE:
    torch.manual_seed(0)
    moe = MoE(preset("tiny", hidden_size=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2,
                     bias_update_speed=0.01))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe.train()


def moe_pass(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward, backward of a quadratic loss; the output, the input's gradient and the routed load."""
    x = x.clone().requires_grad_()
    y = moe(x)
    (y**2).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "load": moe.load.clone()}


def _ep_runs(rank: int, tmp: Path, shards: str) -> None:
    # one MoE layer: each rank holds 2 of the 4 experts and routes its own 3 sequences
    moe = moe_layer()
    apply_expert_parallel(moe, dist.group.WORLD)
    x = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(1))[3 * rank:3 * rank + 3]
    out = moe_pass(moe, x)
    out["grads"] = {k: p.grad for k, p in moe.named_parameters()}
    moe.update_bias()
    out["bias"] = moe.gate.e_score_correction_bias.clone()
    out["global_load"] = moe.last_load.clone()
    torch.save(out, tmp / f"moe{rank}.pt")

    # whole models: EP with FSDP (and Muon on the FSDP shards), EP with DDP
    shards = Path(shards)
    ep_fsdp = train(tiny_model(), loader(shards, 2), cfg(parallel="fsdp", ep=2, optimizer="muon"), tmp / "ep_fsdp")
    ep_ddp = train(tiny_model(), loader(shards, 2), cfg(parallel="ddp", ep=2), tmp / "ep_ddp")
    if rank == 0:
        (tmp / "ep.json").write_text(json.dumps({"fsdp": losses(ep_fsdp["history"]),
                                                 "ddp": losses(ep_ddp["history"])}))


def test_expert_parallel_matches_single_process(tmp_path, shards):
    spawn(_ep_runs, tmp_path, str(shards))
    ref_moe = moe_layer()
    x = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(1))
    ref = moe_pass(ref_moe, x)
    ranks = [torch.load(tmp_path / f"moe{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["y"], ref["y"][3 * r:3 * r + 3], atol=1e-5, rtol=1e-5)  # forward
        torch.testing.assert_close(got["dx"], ref["dx"][3 * r:3 * r + 3], atol=1e-5, rtol=1e-5)  # backward
        local = [k for k in got["grads"] if ".experts." in k or k.startswith("experts.")]
        assert sorted({k.split(".")[1] for k in local}) == [str(2 * r), str(2 * r + 1)]  # 2 experts each
        for k in local:  # each expert's gradient, from both ranks' tokens, on its owner
            torch.testing.assert_close(got["grads"][k], ref_moe.get_parameter(k).grad, atol=1e-5, rtol=1e-5)
    # the replicated router and shared experts: gradients summed over ranks (what DDP / FSDP reduce)
    for k in ("gate.weight", "shared_experts.up_proj.weight"):
        torch.testing.assert_close(ranks[0]["grads"][k] + ranks[1]["grads"][k], ref_moe.get_parameter(k).grad,
                                   atol=1e-5, rtol=1e-5)
    # loads: each rank counted its tokens; the bias update used the global count, the same on both ranks
    torch.testing.assert_close(ranks[0]["load"] + ranks[1]["load"], ref["load"])
    ref_moe.update_bias()
    for got in ranks:
        torch.testing.assert_close(got["global_load"], ref["load"])
        torch.testing.assert_close(got["bias"], ref_moe.gate.e_score_correction_bias)
    assert ref_moe.gate.e_score_correction_bias.abs().sum() > 0

    # whole models trained with experts sharded: the losses and the gathered HF weights of one process
    got = json.loads((tmp_path / "ep.json").read_text())
    refs = {}
    for name, optimizer in (("ddp", "adamw"), ("fsdp", "muon")):
        ref_run, refs[name] = single(shards, tmp_path / f"single_{name}", optimizer=optimizer)
        assert losses(ref_run["history"]) == pytest.approx(got[name], abs=1e-5), name
        assert_weights_close(tmp_path / f"ep_{name}", refs[name])
    # the EP checkpoint (each expert saved by its owner) loads in one process, every expert in place
    shutil.rmtree(tmp_path / "ep_ddp")
    summary = train(tiny_model(seed=3), BatchLoader(PackedDataset(shards, 16), 4, seed=5, rank=0, world_size=1),
                    cfg(), tmp_path / "ep_ddp", resume=True)  # at step 6 already: it loads and saves
    assert summary["step"] == STEPS
    assert_weights_close(tmp_path / "ep_ddp", refs["ddp"])


# --- GRPO on two ranks, sharded ---------------------------------------------------------------------------
def _digit_share(prompt, completion, **kw):
    with open(os.environ["SEEN_PROMPTS"], "a") as f:  # which rank rolled out which prompt
        f.write(json.dumps([os.environ["RANK"], prompt]) + "\n")
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def _grpo_runs(rank: int, tmp: Path, base: str) -> None:
    from seekling.train.grpo import RLConfig, train_rl

    os.environ["SEEN_PROMPTS"] = str(tmp / "seen.jsonl")
    rl = RLConfig(steps=2, prompts_per_step=4, group_size=2, max_new_tokens=4, lr=3e-3, w_accuracy=0, w_format=0,
                  w_custom=1.0, save_every=1, parallel="fsdp", ep=2)
    prompts = [{"prompt": f"question {i}"} for i in range(8)]
    train_rl(base, tmp / "rl", tmp / "state", rl, prompts=prompts, reward_fn=_digit_share, log=lambda s: None)
    # DDP, dynamic sampling, and no signal at all on rank 1: it keeps no group, yet must take part in the update
    rl = dataclasses.replace(rl, steps=1, parallel="ddp", ep=1, dynamic_sampling=True, max_sampling_rounds=2)
    train_rl(base, tmp / "rl_dyn", tmp / "state_dyn", rl, prompts=prompts, reward_fn=_rank0_only, log=lambda s: None)


def _rank0_only(prompt, completion, **kw):
    return 0.0 if os.environ["RANK"] == "1" else sum(map(ord, completion)) % 7 / 7


def test_grpo_on_two_sharded_ranks(tmp_path):
    from seekling.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world 123", "abc def 456 789"] * 20, vocab_size=300)
    base = tmp_path / "base"
    model = tiny_model()
    model.config.vocab_size = tok.vocab_size
    model = Transformer(model.config)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    spawn(_grpo_runs, tmp_path, str(base))
    rows = [json.loads(line) for line in (tmp_path / "state" / "rl_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["groups_used"] == 4 for r in rows)
    # each rank rolled out its own half of each step's prompts: 2 steps x 4 prompts, none twice
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    by_rank = {r: {p for rr, p in seen if rr == r} for r in ("0", "1")}
    assert len(by_rank["0"]) == len(by_rank["1"]) == 4 and not by_rank["0"] & by_rank["1"]
    assert saved_state(tmp_path / "state")["step"] == 2
    trained = seekling.load_pretrained(tmp_path / "rl")  # gathered from the shards, experts included
    assert any((p - q).abs().max() > 0 for p, q in zip(trained.parameters(), model.parameters(), strict=True))

    # rank 1 dropped its 4 zero-variance groups (2 per round): only rank 0's 2 groups trained the policy
    (row,) = [json.loads(line) for line in (tmp_path / "state_dyn" / "rl_log.jsonl").read_text().splitlines()]
    assert row["groups_used"] == 2 and row["zero_var_frac"] == pytest.approx(4 / 6) and row["grad_norm"] > 0
    trained = seekling.load_pretrained(tmp_path / "rl_dyn")
    assert any((p - q).abs().max() > 0 for p, q in zip(trained.parameters(), model.parameters(), strict=True))

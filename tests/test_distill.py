"""Distillation: the KD divergences on hand-computed cases, a student pulled toward a teacher by KD, the
on-policy batches, the tokenizer check, the command, and the end-to-end path a real user takes: a tiny
seekling teacher served over HTTP -> `collect` harvests its traces -> SFT on them -> the student learns."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_serve import LiveServer

from seekling.data import IGNORE_INDEX, BatchLoader, SFTDataset
from seekling.engine import Engine
from seekling.model import Transformer
from seekling.model.config import preset
from seekling.model.load import load_pretrained
from seekling.tasks import sample_problems
from seekling.tokenizer import train_tokenizer
from seekling.train.collect import collect, load_traces, score_task, task_prompts
from seekling.train.distill import OnPolicyBatches, check_compatible, kd_loss, make_kd_loss, teacher_samples
from seekling.train.trainer import TrainConfig, train

VOCAB = 64


def tiny_model(vocab: int = VOCAB, seed: int = 0, hidden: int = 32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset(
        "tiny", vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=256))


@pytest.fixture(scope="module")
def tok():
    """A BPE tokenizer with the R1 chat tokens, trained on addition transcripts."""
    problems = sample_problems("addition", 60, "train", 1, seed=0)
    texts = [f"{p.question} {p.trace} {p.answer}" for p in problems]
    return train_tokenizer(texts, vocab_size=300)


# --- the divergences -----------------------------------------------------------------------------------


def test_kl_hand_computed():
    p_t, p_s = [0.5, 0.5], [0.25, 0.75]
    t, s = torch.tensor([p_t]).log(), torch.tensor([p_s]).log()
    forward = sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    reverse = sum(b * math.log(b / a) for a, b in zip(p_t, p_s, strict=True))
    assert kd_loss(s, t, kind="forward").item() == pytest.approx(forward, rel=1e-5)
    assert kd_loss(s, t, kind="reverse").item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-2)  # KL is not symmetric
    # generalised JSD with β = 0.3: M = 0.3 p_T + 0.7 p_S
    beta = 0.3
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s, strict=True)]
    jsd = beta * sum(a * math.log(a / c) for a, c in zip(p_t, m, strict=True)) \
        + (1 - beta) * sum(b * math.log(b / c) for b, c in zip(p_s, m, strict=True))
    assert kd_loss(s, t, kind="mix", mix=beta).item() == pytest.approx(jsd, rel=1e-5)
    # its limits: ~ β·forward KL as β -> 0, ~ (1-β)·reverse KL as β -> 1
    eps = 1e-4
    assert kd_loss(s, t, kind="mix", mix=eps).item() / eps == pytest.approx(forward, rel=1e-2)
    assert kd_loss(s, t, kind="mix", mix=1 - eps).item() / eps == pytest.approx(reverse, rel=1e-2)


def test_kl_zero_for_equal_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    for kind in ("forward", "reverse", "mix"):
        assert kd_loss(a, a.clone(), kind=kind, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
        assert kd_loss(a, a + 3.0, kind=kind).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
        assert kd_loss(a, b, kind=kind).item() > 0.01


def test_temperature_scaling():
    # logits 2·log p at T=2 give back p; the loss is then KL(p) × T² = 4 KL(p)
    p_t, p_s = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.2, 0.3, 0.5]])
    kl = (p_t * (p_t / p_s).log()).sum().item()
    loss = kd_loss(2 * p_s.log(), 2 * p_t.log(), kind="forward", temperature=2.0)
    assert loss.item() == pytest.approx(4 * kl, rel=1e-5)
    # a higher temperature flattens both distributions: less divergence before the T² factor
    assert kd_loss(2 * p_s.log(), 2 * p_t.log(), temperature=4.0).item() / 16 < kl


def test_masking():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    t_wild = t.clone()
    t_wild[~mask] = 100 * torch.randn(int((~mask).sum()), 7, generator=g)  # masked positions must not count
    per_token = [kd_loss(s[i, j], t[i, j]).item() for i, j in [(0, 0), (0, 1), (1, 1)]]
    assert kd_loss(s, t_wild, mask).item() == pytest.approx(sum(per_token) / 3, rel=1e-5)
    assert kd_loss(s, t, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        kd_loss(s, t, mask[:, :3])


def test_bad_arguments():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="kind"):
        kd_loss(x, x, kind="sideways")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(x, x, temperature=0)
    with pytest.raises(ValueError, match="β"):
        kd_loss(x, x, kind="mix", mix=1.0)
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="kind"):
        make_kd_loss(tiny_model(), kind="sideways")


# --- a student distilled from a teacher ----------------------------------------------------------------


def kd_stats(student, teacher, batch):
    with torch.no_grad():
        s, t = student(batch["input_ids"]).logits[:, :-1], teacher(batch["input_ids"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    agree = ((s.argmax(-1) == t.argmax(-1)) & mask).sum() / mask.sum()
    return kd_loss(s, t, mask).item(), agree.item()


@pytest.mark.parametrize("kind", ["forward", "mix"])
def test_student_moves_toward_teacher(tmp_path, kind, device):
    teacher = tiny_model(seed=1, hidden=48).eval()
    with torch.no_grad():  # a confident teacher (random init is nearly uniform): something to learn
        teacher.lm_head.weight.mul_(30)
    g = torch.Generator().manual_seed(0)
    samples = [(ids, [0] * 4 + [1] * 12) for ids in torch.randint(2, VOCAB, (64, 16), generator=g).tolist()]
    data = SFTDataset(samples, 16, pad_id=0)
    held_out = data.collate([data[i] for i in range(48, 64)])
    data.samples = data.samples[:48]
    student = tiny_model(seed=2)
    kl0, agree0 = kd_stats(student.eval(), teacher, held_out)
    cfg = TrainConfig(max_steps=40, lr=1e-2, min_lr=1e-3, warmup_steps=3, log_every=10, device=device)
    summary = train(student, BatchLoader(data, 8, seed=0), cfg, tmp_path / "kd",
                    loss_fn=make_kd_loss(teacher, kind=kind, temperature=1.0))
    kl1, agree1 = kd_stats(student.eval().cpu(), teacher.cpu(), held_out)
    assert kl1 < 0.7 * kl0, (kl0, kl1)
    assert agree1 > agree0 + 0.1, (agree0, agree1)
    logged = [h for h in summary["history"] if "kd" in h]
    assert logged and logged[-1]["kd"] < logged[0]["kd"] and "top1_agree" in logged[-1]


# --- data: teacher samples and on-policy batches -------------------------------------------------------


def test_teacher_samples_and_on_policy_batches(tok, tmp_path):
    model = tiny_model(tok.vocab_size, seed=3)
    problems = sample_problems("addition", 3, "train", 1, seed=0)
    path = tmp_path / "samples.jsonl"
    records = teacher_samples(model, tok, problems, path, n=2, max_tokens=12)
    assert len(records) == 6 and all(r["score"] in (0.0, 1.0) and r["answer"] for r in records)
    assert len(load_traces(path)) == 6
    assert teacher_samples(None, tok, problems, path) == records  # reused, not resampled

    prompts = [[{"role": "user", "content": p.question}] for p in problems]
    batches = OnPolicyBatches(model, tok, prompts, None, frac=1.0, batch_size=4, max_tokens=10, seed=5)
    b = next(batches)
    prompt_ids = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in prompts]
    for row_ids, row_labels in zip(b["input_ids"].tolist(), b["labels"].tolist(), strict=True):
        start = next(i for i, v in enumerate(row_labels) if v != IGNORE_INDEX)
        assert row_ids[:start] in prompt_ids  # the prompt, unlabelled, then the student's own completion
        completion = [v for v in row_labels[start:] if v != IGNORE_INDEX]
        assert 1 <= len(completion) <= 10 and row_ids[start:start + len(completion)] == completion
    # resuming from state_dict() continues the same stream
    state = batches.state_dict()
    again = OnPolicyBatches(model, tok, prompts, None, frac=1.0, batch_size=4, max_tokens=10, seed=5)
    again.load_state_dict(state)
    assert torch.equal(next(again)["input_ids"], next(batches)["input_ids"])

    # a mixed stream: about λ of the batches on-policy, the rest from the fixed loader
    fixed = BatchLoader(SFTDataset([tok.encode_sft(c) for c in load_traces(path)], 256, tok.pad_token_id), 2)
    mixed = OnPolicyBatches(model, tok, prompts, fixed, frac=0.25, batch_size=2, max_tokens=4, seed=0)
    for _ in range(40):
        next(mixed)
    assert 4 <= mixed.on_policy <= 16 and fixed.batch + fixed.epoch * fixed.batches_per_epoch == 40 - mixed.on_policy
    with pytest.raises(ValueError, match="fixed data"):
        OnPolicyBatches(model, tok, prompts, None, frac=0.5, batch_size=2)


def test_tokenizer_mismatch(tok):
    other = train_tokenizer(["completely different words here, nothing about numbers"] * 30, vocab_size=300)
    teacher, student = tiny_model(tok.vocab_size), tiny_model(tok.vocab_size, seed=1)
    check_compatible(teacher, student, tok, tok)  # the same tokenizer: fine
    with pytest.raises(ValueError, match="different ids"):
        check_compatible(teacher, student, tok, other)
    with pytest.raises(ValueError, match="vocab_size"):
        check_compatible(teacher, tiny_model(tok.vocab_size + 8), tok, tok)


def test_cli_logits(tok, tmp_path, capsys):
    from seekling.cli import main

    for name, seed in (("teacher", 4), ("student", 5)):
        tiny_model(tok.vocab_size, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    main(["distill", "logits", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
          "--out", str(tmp_path / "kd"), "--tasks", "addition", "--levels", "1", "--count", "8",
          "--max-new-tokens", "12", "--batch-size", "4", "--steps", "4", "--warmup", "1", "--kind", "reverse",
          "--on-policy-frac", "0.5", "--checkpoint-every", "2"])
    out = capsys.readouterr().out
    assert "teacher samples: 8" in out and "step 4/4" in out
    assert load_pretrained(tmp_path / "kd").config.vocab_size == tok.vocab_size
    assert (tmp_path / "train_state" / "kd" / "teacher_samples.jsonl").exists()
    metrics_file = tmp_path / "train_state" / "kd" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert metrics[-1]["step"] == 4 and "kd" in metrics[-1]

    other = train_tokenizer(["completely different words here"] * 30, vocab_size=300)
    other.save_pretrained(tmp_path / "teacher")
    with pytest.raises(SystemExit):
        main(["distill", "logits", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
              "--out", str(tmp_path / "kd2"), "--tasks", "addition", "--steps", "1"])
    assert "same tokenizer" in capsys.readouterr().err


# --- end to end: serve a teacher, harvest it, SFT a student ---------------------------------------------


def sft_loss(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return model(**data.collate(data.samples)).ce_loss.item()


def test_end_to_end_serve_collect_sft(tok, tmp_path):
    # the teacher: a tiny model taught the R1 answer shape (reasoning, </think>, answer) by a short SFT
    problems = sample_problems("addition", 8, "train", 1, seed=0)
    teach = SFTDataset([tok.encode_sft(p.messages(with_trace=True)) for p in problems], 256, tok.pad_token_id)
    teacher = tiny_model(tok.vocab_size, seed=6, hidden=48)
    train(teacher, BatchLoader(teach, 8), TrainConfig(max_steps=60, lr=1e-2, min_lr=1e-3, warmup_steps=5,
                                                     log_every=30), tmp_path / "teacher")
    server = LiveServer(Engine(teacher.eval(), tok, max_num_seqs=16), model_name="teacher",
                        data_dir=str(tmp_path / "server"))
    try:
        prompts = task_prompts("addition", 6, difficulty=1, seed=0)
        # greedy, so what the harvest holds is deterministic (sampled text made the checks below flaky)
        stats = collect(prompts, tmp_path / "traces.jsonl", base_url=server.url + "/v1", model="teacher", n=2,
                        concurrency=4, temperature=0.0, max_tokens=80, timeout=60, score=score_task)
    finally:
        server.close()
    assert stats["accepted"] == 12 and stats["failed"] == 0
    records = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    # the server split each answer at </think>: reasoning_content holds the teacher's working
    assert all(r["reasoning_content"] and "</think>" not in r["reasoning_content"] for r in records)
    assert all("+" in r["reasoning_content"] for r in records)
    assert all(r["score"] in (0.0, 1.0) for r in records)

    # SFT a fresh student on the harvested traces: its loss on them falls
    conversations = load_traces(tmp_path / "traces.jsonl")
    assert conversations[0][-1]["reasoning_content"] == records[0]["reasoning_content"]
    data = SFTDataset([tok.encode_sft(c) for c in conversations], 256, tok.pad_token_id, truncate=True)
    student = tiny_model(tok.vocab_size, seed=7)
    before = sft_loss(student, data)
    train(student, BatchLoader(data, 6), TrainConfig(max_steps=20, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                                                     log_every=10), tmp_path / "student")
    after = sft_loss(student, data)
    assert after < 0.7 * before, (before, after)

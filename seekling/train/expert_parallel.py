"""Expert parallelism for DeepSeekMoE (DeepSeek-V3 §3; torchtitan's deepseek_v3): the routed experts of every
MoE layer are sharded across the ranks of an `ep` group, rank i holding experts [i·E/ep, (i+1)·E/ep); the
router and the shared experts stay replicated (DDP or FSDP handle their gradients like any other weight).

One MoE forward on ep ranks, each on its own tokens:
  1. route locally and sort the (token, expert) pairs by expert, as the single-process MoE does;
  2. exchange counts: an all_to_all_single of how many pairs each rank sends to each expert;
  3. dispatch: an all_to_all_single of the pairs' rows (the token and its gate weight) to the experts' owners;
  4. each rank runs each of its experts once on the rows it received, grouped by expert;
  5. combine: the reverse all_to_all_single, then the weighted rows are added to their tokens (index_add).
The row exchanges are autograd functions: backward runs them in reverse, so an expert's gradient on its
owner sums the contributions of every rank's tokens. Every local expert runs on every call, with no rows
if none came: the ranks then always produce the same set of gradients (FSDP2's reduce-scatter and the
"edp" all-reduce need that). The routing-bias update needs nothing here: `MoE.update_bias` all-reduces
the expert loads counted on each rank's tokens, so every rank applies the same, global update.

The hook in the model is one attribute: `MoE.dispatch_fn`, called instead of `MoE.dispatch` when set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from seekling.model.moe import MoE

EXPERT_WEIGHTS = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


class ExpertDispatch:
    """`MoE.dispatch_fn` that runs this rank's `experts` (global index -> module) on the pairs routed to
    them, by all-to-all over `group` when it has more than one rank (a plain callable, not a module, so
    the experts stay registered under the MoE's own names)."""

    def __init__(self, n_experts: int, experts: dict[int, nn.Module], group: dist.ProcessGroup | None = None):
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.n_experts, self.n_local = n_experts, n_experts // self.size
        first = (dist.get_rank(group) if group is not None else 0) * self.n_local
        self.experts = [experts[first + i] for i in range(self.n_local)]

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        flat_idx = indices.flatten()
        order = flat_idx.argsort(stable=True)
        token_of = order // indices.shape[1]
        counts = torch.bincount(flat_idx, minlength=self.n_experts)
        w_sorted = weights.flatten().index_select(0, order).unsqueeze(-1).to(x.dtype)
        rows = torch.cat([x.index_select(0, token_of), w_sorted], dim=-1)  # a pair's token and weight travel together
        y = self._run(rows, counts) if self.size == 1 else self._exchange(rows, counts)
        if out is None:
            out = torch.zeros_like(x)
        return out.index_add(0, token_of, y)

    def _run(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows grouped by local expert (counts [n_local]) -> each expert's weighted output, same order."""
        parts = rows.split(counts.tolist())
        return torch.cat([expert(p[:, :-1], p[:, -1:]) for expert, p in zip(self.experts, parts, strict=True)])

    def _exchange(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        send = counts.view(self.size, self.n_local)  # [owner rank, its expert]: the pairs this rank sends
        recv = torch.empty_like(send)  # [source rank, my expert]: the pairs each rank sends me
        dist.all_to_all_single(recv, send, group=self.group)
        send_split, recv_split = send.sum(1).tolist(), recv.sum(1).tolist()
        got = _all_to_all(rows, recv_split, send_split, self.group)
        # the rows arrive by source rank, then by expert: group them by expert, run, put them back
        expert_of = torch.arange(self.n_local, device=rows.device).repeat(self.size).repeat_interleave(recv.flatten())
        perm = expert_of.argsort(stable=True)
        y = self._run(got.index_select(0, perm), recv.sum(0)).index_select(0, perm.argsort())
        return _all_to_all(y, send_split, recv_split, self.group)


def _all_to_all(x: torch.Tensor, out_split: list[int], in_split: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """Rows of x to the ranks of group (in_split[i] rows to rank i, out_split[i] back from it), differentiable:
    the functional collective torchtitan dispatches with (its result waits for the exchange when first used)."""
    return all_to_all_single_autograd(x.contiguous(), out_split, in_split, group)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def run_every_expert(model: nn.Module) -> None:
    """Make each MoE run all its experts on every call (no exchange): what FSDP2 needs without ep."""
    for _, moe in _moe_layers(model):
        moe.dispatch_fn = ExpertDispatch(moe.n_experts, dict(enumerate(moe.experts)))


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Keep only this rank's share of each MoE layer's routed experts (as a ModuleDict keyed by the global
    index, so parameter names stay `mlp.experts.E.*`) and route through the all-to-all dispatch."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    for name, moe in _moe_layers(model):
        if moe.n_experts % size:
            raise ValueError(f"{name}: {moe.n_experts} routed experts cannot be split evenly over ep={size} ranks")
        n_local = moe.n_experts // size
        local = {i: moe.experts[i] for i in range(rank * n_local, (rank + 1) * n_local)}
        moe.experts = nn.ModuleDict({str(i): m for i, m in local.items()})
        moe.dispatch_fn = ExpertDispatch(moe.n_experts, local, group)


def expert_param_names(model: nn.Module) -> set[str]:
    """Names of the routed experts' parameters this rank holds under expert parallelism."""
    return {f"{name}.experts.{k}.{w}" for name, moe in _moe_layers(model)
            if isinstance(moe.experts, nn.ModuleDict) for k in moe.experts for w in EXPERT_WEIGHTS}


@torch.no_grad()
def gather_experts(model: nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Every routed expert's weights of an expert-parallel model, by their Hugging Face names, on every rank
    of `group` (one all_gather per layer and weight; a collective)."""
    size = dist.get_world_size(group)
    out = {}
    for name, moe in _moe_layers(model):
        keys = sorted(moe.experts, key=int)
        for w in EXPERT_WEIGHTS:
            local = torch.stack([moe.experts[k].get_parameter(w).detach() for k in keys])
            parts = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(parts, local.contiguous(), group=group)
            for i, t in enumerate(torch.cat(parts)):
                out[f"{name}.experts.{i}.{w}"] = t.clone()  # own storage: safetensors refuses shared
    return out

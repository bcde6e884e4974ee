"""DeepSeekMoE (DeepSeek-V3 §2.1.2, DeepSeek-V2 §2.2): fine-grained routed experts + shared experts, the
router with its V3 and V2 variants, and auxiliary-loss-free load balancing.

Routing, for token u with hidden u_t (eqs. 13-16 of the V3 report):
    s_{i,t} = sigmoid(u_t · e_i)                              affinity to routed expert i
    pick top-k experts on s_{i,t} + b_i                        b: e_score_correction_bias
    g_{i,t} = s_{i,t} / Σ_{j∈topk} s_{j,t} · routed_scaling     gate weights come from the unbiased s
    h'_t = u_t + Σ_shared FFN(u_t) + Σ_{i∈topk} g_{i,t} FFN_i(u_t)
The bias b only steers which experts are chosen; it gets no gradient and is updated after each
optimizer step by b_i += γ·sign(mean_load − load_i) (`update_bias`).
DeepSeek-V2 (eqs. 20-22 of its report) scores with a softmax over the experts, picks the top-k scores with no
bias (`greedy`), or within the topk_group groups of highest best score (`group_limited_greedy`), and its
released checkpoints do not renormalise the k weights (norm_topk_prob false). `route` is that one function with
the variants as options.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seekling.model.config import ModelConfig
from seekling.model.layers import MLP, fuse_parameters, silu_mul
from seekling.model.quant import Int4Weight, Int8Weight, linear, quantize_stack


class Gate(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.scoring_func, self.topk_method = config.scoring_func, config.topk_method
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        # Only noaux_tc routing has the balancing bias (a V2 checkpoint has no such tensor). fp32 always: the
        # bias moves in steps of ~1e-3, which bf16 could not represent near 1.
        bias = torch.zeros(self.n_experts, dtype=torch.float32) if self.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, h] -> (weights [N, k] fp32, indices [N, k], scores [N, E] fp32)."""
        w = self.weight if self.weight.dtype == torch.float32 else self.weight.float()
        logits = F.linear(x if x.dtype == torch.float32 else x.float(), w)  # routing in fp32
        return route(logits, self.top_k, self.scoring_func, self.topk_method, self.e_score_correction_bias,
                     self.n_group, self.topk_group, self.norm_topk_prob, self.route_scale)


def route(logits: torch.Tensor, top_k: int, scoring_func: str = "sigmoid", topk_method: str = "noaux_tc",
          bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
          route_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (gate weights [N, k], expert indices [N, k], scores [N, E]): DeepSeek's routing
    in each of its variants (the module docstring). The top-k is chosen on the scores (+ the balancing bias for
    noaux_tc), within the best groups when n_group > 1; the weights are the unbiased scores, renormalised over
    the k when norm_topk_prob, times route_scale. A function of tensors and constants, so a compiled graph can
    hold it."""
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    chosen_by = scores.detach() + bias if topk_method == "noaux_tc" and bias is not None else scores.detach()
    if n_group > 1 and topk_method != "greedy":
        # Group-limited routing: keep the topk_group groups with the highest group score, the sum of their best
        # two (noaux_tc) or their best one (group_limited_greedy).
        grouped = chosen_by.view(-1, n_group, chosen_by.shape[-1] // n_group)
        best = 2 if topk_method == "noaux_tc" else 1
        group_scores = grouped.topk(best, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        chosen_by = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    indices = chosen_by.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return (weights if route_scale == 1.0 else weights * route_scale), indices, scores


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.gamma = config.bias_update_speed
        self.alpha = config.seq_aux_alpha
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(self.n_experts))
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        # Tokens routed to each expert since the last bias update (training only; not saved).
        self.register_buffer("load", torch.zeros(self.n_experts), persistent=False)
        self.register_buffer("last_load", torch.zeros(self.n_experts), persistent=False)  # for logging
        self.balance_loss: torch.Tensor | None = None
        self.dispatch_fn: Callable[..., torch.Tensor] | None = None  # replaces dispatch when set (expert parallelism)
        # `infer` reads the routed experts stacked, built by `prepare`: [E, 2I, h] ([gate; up] each) and
        # [E, h, I]; each expert's own w13 / w2 are views of these.
        self.w13: torch.Tensor | Int8Weight | Int4Weight | None = None
        self.w2: torch.Tensor | Int8Weight | Int4Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat)
        out = (self.dispatch_fn or self.dispatch)(flat, weights, indices, out=self.shared_experts(flat))
        if self.training:
            with torch.no_grad():
                self.load += torch.bincount(indices.flatten(), minlength=self.n_experts).to(self.load.dtype)
            self.balance_loss = self.sequence_balance_loss(scores, indices, shape) if self.alpha > 0 else None
        return out.view(shape)

    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """Group the (token, expert) pairs by expert with one sort, run each expert once on its
        tokens, and add the weighted results to `out` (zeros if None; forward passes the shared
        experts' output); no loop over tokens.

        Measured choices (benchmarks/bench_model.py): gathering with index_select and adding back
        with one index_add (its backward is a cheap index_select) beat x[idx] (whose backward is a
        scatter_add) and a per-expert index_add_; padding the experts into one stacked bmm lost to
        this loop on CPU (the padding costs more than the per-expert ops save); concatenating gate and
        up weights into one matmul per call gained nothing measurable."""
        flat_idx = indices.flatten()
        order = flat_idx.argsort(stable=True)
        token_of = order // self.top_k  # which token each sorted pair came from
        counts = torch.bincount(flat_idx, minlength=self.n_experts).tolist()  # tiny host sync, needed to split
        x_sorted = x.index_select(0, token_of)
        w_sorted = weights.flatten().index_select(0, order).unsqueeze(-1).to(x.dtype)
        parts = zip(self.experts, x_sorted.split(counts), w_sorted.split(counts), counts, strict=True)
        ys = [expert(xe, we) for expert, xe, we, n in parts if n]
        if out is None:
            out = torch.zeros_like(x)
        return out.index_add(0, token_of, torch.cat(ys)) if ys else out

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Complementary sequence-wise balance loss (V3 eqs. 17-20): α Σ_i f_i P_i per sequence."""
        B, T = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
        probs = (scores / scores.sum(-1, keepdim=True)).view(B, T, self.n_experts)
        chosen = torch.zeros(B * T, self.n_experts, device=scores.device)
        chosen.scatter_(1, indices, 1.0)
        f = chosen.view(B, T, self.n_experts).mean(1) * (self.n_experts / self.top_k)
        return self.alpha * (f * probs.mean(1)).sum(-1).mean()

    # --- inference --------------------------------------------------------------------------------------
    def prepare(self, quantize_to: str | None = None) -> list[nn.Parameter]:
        """Stack the routed experts (views of one storage for fp32 / bf16, an int8 copy otherwise) and prepare
        the shared experts; returns the parameters an int8 copy replaced."""
        E = self.n_experts
        pairs = [w for e in self.experts for w in (e.gate_proj.weight, e.up_proj.weight)]
        downs = [e.down_proj.weight for e in self.experts]
        two_i, h = self.experts[0].gate_proj.weight.shape[0] * 2, self.experts[0].gate_proj.weight.shape[1]
        if quantize_to is None:
            self.w13 = fuse_parameters(pairs, self).view(E, two_i, h)
            self.w2 = fuse_parameters(downs, self).view(E, h, two_i // 2)
        else:  # [E, out, in], each expert quantised into its slot (a streaming load reads one expert at a time)
            self.w13 = quantize_stack([[e.gate_proj.weight, e.up_proj.weight] for e in self.experts], quantize_to)
            self.w2 = quantize_stack([[e.down_proj.weight] for e in self.experts], quantize_to, "expert_down")
        for e, expert in enumerate(self.experts):
            expert.w13, expert.w2 = self.w13[e], self.w2[e]
        replaced = self.shared_experts.prepare(quantize_to)
        return replaced + (pairs + downs if quantize_to is not None else [])

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """DeepSeekMoE on the prepared experts, x [N, h] normalised. One token runs its k experts by index
        (views of the stacked weights); inside a compiled graph a few tokens run every expert, weighted by the
        gate (0 for the experts not chosen: E/k the FLOPs, but no data-dependent dispatch, which a graph
        cannot hold); more tokens are grouped by expert with one sort (as `dispatch` does in training)."""
        weights, indices, _ = self.gate(x)
        out = self.shared_experts.infer(x)
        N = x.shape[0]
        if N == 1:  # its k experts by index; eager reads them as Python numbers (two ops instead of 4k)
            if torch.compiler.is_compiling():
                chosen = [(indices[0, j].item(), weights[0, j].to(x.dtype)) for j in range(self.top_k)]
            else:
                chosen = zip(indices[0].tolist(), weights[0].tolist(), strict=True)
            for e, g in chosen:
                out = out + self._expert(x, e, g)
            return out
        if torch.compiler.is_compiling():
            E = self.n_experts
            gates = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter(1, indices, weights.to(x.dtype))
            if isinstance(self.w13, Int8Weight | Int4Weight):  # one quantised matmul pair per expert, all N rows
                for e in range(E):
                    out = out + self._expert(x, e, gates[:, e:e + 1])
                return out
            _, two_i, h = self.w13.shape  # float: all experts' gate/up in one matmul, the down ones in one bmm
            act = silu_mul(linear(x, self.w13.view(E * two_i, h)).view(N, E, two_i))  # [N, E, I]
            return out + torch.bmm((act * gates[..., None]).transpose(0, 1), self.w2.transpose(1, 2)).sum(0)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        xs = x.index_select(0, token_of).split(counts)
        ws = weights.flatten().index_select(0, order).unsqueeze(-1).to(x.dtype).split(counts)
        ys = [self._expert(xe, e, we) for e, (xe, we, n) in enumerate(zip(xs, ws, counts, strict=True)) if n]
        return out.index_add_(0, token_of, torch.cat(ys))

    def _expert(self, x: torch.Tensor, e: int, scale: torch.Tensor | float) -> torch.Tensor:
        return linear(silu_mul(linear(x, self.w13[e])) * scale, self.w2[e])

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing: push under-loaded experts' bias up, over-loaded down."""
        load = self.load
        if self.gate.e_score_correction_bias is None:  # routing without a balancing bias (DeepSeek-V2)
            load.zero_()
            return
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank must apply the same update
        if load.sum() > 0:
            self.gate.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
            self.last_load.copy_(load)
        load.zero_()

"""Int8 quantisation of a model's Linear layers (weights and activations), for faster CPU decoding.

Batch-1 decode is bound by the bytes of weights read per token. Weight-only int8 gained only 1.3x here:
torch's weight-only kernel (`_weight_int8pack_mm`, bf16 activations) is compute-bound at ~6 GB/s of
weights on this AVX2 CPU without native bf16. So activations are quantised too, per call, and the product
runs in fbgemm's int8 x int8 GEMM (`torch.fbgemm_linear_int8_weight_fp32_activation`): 3-6x faster than
an fp32 matmul at one row, ~3 us of call overhead (`quantized::linear_dynamic`, the same kernel behind a
TorchScript-class argument, costs ~20 us per call from Python; oneDNN's qlinear was 3-7x slower).
torch 2.13 marks these fbgemm entry points deprecated; they warn once, which packing absorbs.

  - weights: symmetric, per output channel, 7 bits (|q| <= 63). The AVX2 kernel sums pairs of u8 x s8
    products in int16 with saturation, and 2 * 255 * 64 < 2^15 keeps that exact. (8-bit weights with
    7-bit activations, quantized::linear_dynamic's `reduce_range`, had a relative RMS error of 0.022 vs
    0.019 on 768x2048 .. 1536x8960 layers; 8-bit both saturates: 0.03-0.12.)
  - activations: asymmetric 8 bits over each row's [min, max], i.e. per token. The kernel takes one
    range per call, so with several rows each row is first mapped affinely onto [-1, 1]
    (x = mid + half * u, so W x = half * W u + mid * W 1): every row is quantised over its own range, and
    a row's result does not depend on the other rows of the call (prefill rows = decode rows, up to
    the single-row path's range [min(x, 0), max(x, 0)]).
  - outlier channels: a per-token range is coarse for a row with a few huge channels (LLMs' "massive
    activations" sit in down_proj inputs). SwiGLU products are heavy-tailed: max|x| / rms(x) of down_proj
    inputs in the trained speedrun model reaches 22 (p99; sqrt(K) = 22.6 is the single-channel limit),
    against <= 9 for every other layer's inputs. So down_proj takes channels above OUTLIER_RATIO x rms
    out of the quantised product and multiplies them unquantised (LLM.int8-style); on the speedrun model
    6% of down_proj rows have one. The check costs ~8 us (two reductions, one host sync) per call.

Measured quality, teacher-forced logits vs fp32 (`mean |d|` / logit std, top-1 agreement, KL):
  trained DeepSeek-V3 MoE runs/speedrun4/rl, 1540 tokens of fp32 greedy completions to 32 test problems:
    this module 0.021, 99.35%, 1.4e-3 (without the down_proj guard 0.022, 99.5%, 1.7e-3; one range per
    call instead of per row 0.115, 98.6%, 1.0e-2); weight-only 8-bit 0.007, 100%, 7e-5. Greedy task
    accuracy on 100 test problems: 0.34, as fp32 and weight-only; 89% of completions identical to fp32.
    (Rounding-level changes to this code moved these by up to 0.2% top-1 and 0.01 accuracy.)
  random 122M Qwen2 (near-tied logits, std 0.07): 0.027, 96.9%; weight-only 0.014, 99.2%.
Speed (benchmarks/bench_dense.py, random 122M Qwen2, batch-1 greedy, 1 thread, load 2.2): 68.1 tokens/s
plain loop, 64.6 through the engine, vs 28.0 transformers fp32 (2.43x, 2.31x; weight-only int8 was 1.25x).
Memory: 2 bytes per weight (the int8 matrix, which the outlier and non-CPU paths read, and fbgemm's packed
copy). The quantised model is for inference only: its state_dict is not the Hugging Face layout.

    model = quantize_int8(load_dense(path, dtype="float32"))
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_QMAX = 63  # 7-bit weights: no int16 saturation in fbgemm's AVX2 kernel (see above)
OUTLIER_RATIO = 16.0  # down_proj channels with |x| > this * rms(row) are not quantised (see above)


def _pack(weight_int8: torch.Tensor) -> torch.Tensor:
    # torch 2.13 marks the fbgemm entry points deprecated and warns once per process (TORCH_WARN_ONCE):
    # packing calls the kernel once under the filter, so the warning is spent here, not in a user's forward
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"fbgemm_\w+ is deprecated", category=UserWarning)
        packed = torch.fbgemm_pack_quantized_matrix(weight_int8)
        n, k = weight_int8.shape
        torch.fbgemm_linear_int8_weight_fp32_activation(torch.zeros(1, k), weight_int8, packed,
                                                        torch.zeros(n, dtype=torch.int32), 1.0, 0, torch.zeros(n))
    return packed


class Int8Linear(nn.Module):
    """y ~= x @ W^T + bias with W ~= weight_int8 * scale[:, None] and x quantised to 8 bits per row.
    With `guard_outliers` (down_proj), outlier channels of x skip the activation quantisation."""

    def __init__(self, linear: nn.Linear, guard_outliers: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.guard_outliers = guard_outliers
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / WEIGHT_QMAX
        weight_int8 = torch.round(w / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("col_offsets", weight_int8.sum(dim=1, dtype=torch.int32))  # the kernel's zero-point term
        self.register_buffer("row_sums", weight_int8.float().sum(dim=1))  # weight_int8 @ 1: the affine row shift
        self.register_buffer("zeros", torch.zeros(self.out_features))  # kernel bias: ours is added after scaling
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.packed = _pack(weight_int8)  # fbgemm's blocked layout: an opaque CPU handle, not a buffer

    def __getstate__(self) -> dict[str, Any]:
        # the packed handle does not survive a copy (deepcopy or pickle); it is rebuilt from weight_int8
        return {k: v for k, v in super().__getstate__().items() if k != "packed"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.packed = _pack(self.weight_int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written for few tensor ops: at batch 1 each op's ~1-2 us of overhead matters beside the kernel
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()  # the kernel takes fp32 activations (bf16 models too)
        if x2.is_cpu:
            y = self._matmul(x2)
        else:  # fbgemm is CPU-only: unquantised activations against the int8 weights
            y = F.linear(x2, self.weight_int8.float())
        y = y * self.scale if self.bias is None else torch.addcmul(self.bias, y, self.scale)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight_int8^T (in units of the int8 weights: the caller applies `scale`), x quantised per row."""
        outliers = self._outlier_channels(x) if self.guard_outliers and x.shape[0] else None
        if outliers is not None:  # multiplied unquantised, so the rest of each row keeps a fine step
            x_out, x = x[:, outliers], x.index_fill(1, outliers, 0.0)
        if x.shape[0] == 1:  # decode at batch 1: the kernel's own range is this token's
            y = self._kernel(x)
        else:  # map each row onto [-1, 1] so that every row is quantised over its own range
            lo, hi = x.aminmax(dim=-1, keepdim=True)
            half = ((hi - lo) / 2).clamp(min=1e-30)
            # exactly -1 at each row's min and 1 at its max (d / (d/2) is exactly 2 in IEEE arithmetic), so
            # every call's range is exactly [-1, 1] and a row's result is bitwise independent of the others
            u = (x - lo).div_(half).sub_(1)
            y = torch.addcmul((lo + half) * self.row_sums, self._kernel(u), half)
        if outliers is not None:
            y = y + x_out @ self.weight_int8[:, outliers].float().T
        return y

    def _outlier_channels(self, x: torch.Tensor) -> torch.Tensor | None:
        """The channels in which some row of x exceeds OUTLIER_RATIO x that row's rms (LLM.int8-style
        decomposition), or None. The first test is cheap (one sync) and decides alone for one row."""
        # max|x| > r * rms(x)  <=>  max|x| * sqrt(K) > r * ||x||; Python floats where possible: at one row,
        # tensor-scalar arithmetic costs more than the reductions
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        lo, hi = x.aminmax()
        if max(-lo.item(), hi.item()) * math.sqrt(self.in_features) <= OUTLIER_RATIO * norms.min().item():
            return None
        big = (x.abs() * math.sqrt(self.in_features) > OUTLIER_RATIO * norms).any(dim=0)
        return big.nonzero().squeeze(1) if big.any() else None

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        # fbgemm: x quantised to u8 over [min(x, 0), max(x, 0)], int32 accumulation, fp32 out; weight
        # scale 1 (the per-channel scales are applied by the caller), bias 0 (ours is added after scaling)
        return torch.fbgemm_linear_int8_weight_fp32_activation(x, self.weight_int8, self.packed, self.col_offsets,
                                                               1.0, 0, self.zeros)


def quantize_int8(model: nn.Module, include_lm_head: bool = True) -> nn.Module:
    """Replace every nn.Linear of `model` in place by an Int8Linear (the embedding stays as it is;
    a tied lm_head gets its own int8 copy); down_proj layers guard against outlier channels. Returns the model."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and (include_lm_head or name != "lm_head")]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, guard_outliers=child == "down_proj"))
    return model

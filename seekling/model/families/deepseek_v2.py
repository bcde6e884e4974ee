"""DeepSeek-V2 (`deepseek_v2`, DeepseekV2ForCausalLM: V2, V2-Lite, V2.5 and their chat models): DeepSeek-V3's
modules, names and GGUF layout (llama.cpp's `deepseek2` covers both), with the router of the V2 report (softmax
scores, greedy top-k or group-limited by each group's best score, no balancing bias, weights not renormalised)
and no MTP module. V2-Lite extends its context with YaRN (factor 40, mscale = mscale_all_dim = 0.707).
"""

from __future__ import annotations

from seekling.model.families.deepseek_v3 import DeepseekV3


class DeepseekV2(DeepseekV3):
    model_type = "deepseek_v2"
    mtp = False
    # DeepseekV2Config's defaults and DeepSeek's V2 modeling code's (transformers' config has no scoring_func)
    defaults = {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                "num_nextn_predict_layers": 0}

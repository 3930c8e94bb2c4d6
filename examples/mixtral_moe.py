"""A small random Mixtral on CPU: the backend finds every attention and MoE block, substitutes the fused MoE op,
and the compiled logits equal eager. `python examples/mixtral_moe.py`"""
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import sqcompile

torch.manual_seed(0)
config = MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
model = MixtralForCausalLM(config).eval()
ids = torch.randint(0, 256, (1, 12))
options = {"quantize": False, "lower": "eager"}  # rotation only: outputs equal eager
print(sqcompile.explain(model, input_ids=ids, options=options))
with torch.no_grad():
    eager = model(input_ids=ids).logits
    compiled = torch.compile(model.forward, backend="spectralquant", options=options)(input_ids=ids).logits
print(f"max |compiled - eager| = {(compiled - eager).abs().max().item():.2e}")

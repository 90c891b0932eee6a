"""Parity with the transformers reference implementations (float32, random tiny weights)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from spark import convert  # noqa: E402
from spark.config import ModelConfig  # noqa: E402
from spark.ffn import GeGLU  # noqa: E402
from spark.model import Transformer  # noqa: E402


def _tiny_gemma2():
    torch.manual_seed(0)
    hf_cfg = transformers.Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
        max_position_embeddings=64, attn_implementation="eager")
    hf = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # random norms so that (1 + w) is exercised
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    return hf_cfg, hf


def test_gemma2_logits_match_transformers():
    hf_cfg, hf = _tiny_gemma2()
    cfg = convert.config_from_hf(hf_cfg.to_dict())
    assert cfg.layer_pattern[:2] == ("local", "global") and cfg.sliding_window == 6
    model = Transformer(cfg, nnx.Rngs(1))
    convert.load_state_dict(model, hf.state_dict())
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 20))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    logits, _ = model(jnp.asarray(tokens), pos)
    diff = float(np.max(np.abs(np.asarray(logits) - ref)))
    print(f"Gemma-2 HF parity max abs diff: {diff:.2e}")
    assert diff <= 1e-4


def test_converter_rejects_bad_input():
    hf_cfg, hf = _tiny_gemma2()
    with pytest.raises(convert.ConfigError, match="unsupported architecture"):
        convert.config_from_hf({**hf_cfg.to_dict(), "model_type": "llama"})
    cfg = convert.config_from_hf(hf_cfg.to_dict())
    sd = dict(hf.state_dict())
    del sd["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(convert.ConfigError, match="missing weight 'layers.2.mlp.up_proj.weight'"):
        convert.load_state_dict(Transformer(cfg, nnx.Rngs(0)), sd)
    bad = convert.config_from_hf(hf_cfg.to_dict(), ffn_dim=256)
    with pytest.raises(convert.ConfigError, match="has shape"):
        convert.load_state_dict(Transformer(bad, nnx.Rngs(0)), hf.state_dict())


def test_gate_sparsity_matches_gemma3n_mlp():
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    hf_cfg = transformers.Gemma3nTextConfig(
        vocab_size=64, hidden_size=48, intermediate_size=[192, 192], num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24,
        activation_sparsity_pattern=[0.95, 0.0], layer_types=["sliding_attention", "full_attention"],
        num_kv_shared_layers=0, hidden_activation="gelu_pytorch_tanh")
    cfg = ModelConfig(vocab_size=64, d_model=48, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=24, ffn_dim=192, gate_sparsity=(0.95, 0.0))
    x = np.random.default_rng(1).normal(size=(2, 7, 48)).astype(np.float32)
    torch.manual_seed(0)
    for layer in range(2):
        ref_mlp = Gemma3nTextMLP(hf_cfg, layer_idx=layer).eval()
        ours = GeGLU(cfg, layer, nnx.Rngs(0))
        ours.w_gate.set_value(jnp.asarray(ref_mlp.gate_proj.weight.detach().numpy()))
        ours.w_up.set_value(jnp.asarray(ref_mlp.up_proj.weight.detach().numpy()))
        ours.w_down.set_value(jnp.asarray(ref_mlp.down_proj.weight.detach().numpy().T))
        with torch.no_grad():
            ref = ref_mlp(torch.tensor(x)).numpy()
        out, aux = ours(jnp.asarray(x), 192)
        diff = float(np.max(np.abs(np.asarray(out) - ref)))
        print(f"Gemma-3n MLP layer {layer} (sparsity {cfg.gate_sparsity[layer]}) max abs diff: {diff:.2e}")
        assert diff <= 1e-5
        if layer == 0:
            assert 0.02 < float(aux["ffn_density"]) < 0.09

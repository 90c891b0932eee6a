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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Gemma-2 saved with save_pretrained, and a SentencePiece model trained here."""
    from spark.data.tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("hf_gemma2")
    train_sentencepiece(["the quick brown fox jumps over the lazy dog " * 40, "def f(x): return x + 1\n" * 40],
                        str(d / "tokenizer.model"), vocab_size=300)
    torch.manual_seed(0)
    hf_cfg = transformers.Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16, max_position_embeddings=64,
        attn_implementation="eager")
    hf = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(d, safe_serialization=True)
    return d, hf


def _convert(*args):
    from spark.cli import main_guard

    with pytest.raises(SystemExit) as e:
        main_guard(lambda: (convert.main(list(args)), __import__("sys").exit(0)))
    return e.value.code


def test_convert_cli_round_trip_and_sample(hf_dir, tmp_path, sample_cli, capsys):
    import json
    import os

    from spark.train import load_checkpoint
    from spark.train_lib import graphdef_of

    d, hf = hf_dir
    out = str(tmp_path / "w")
    assert _convert("--hf_dir", str(d), "--out", out) == 0
    cfg, params, step = load_checkpoint(out)
    assert step == 0 and cfg.data.tokenizer == "sentencepiece" and os.path.exists(os.path.join(out, "tokenizer.model"))
    model = nnx.merge(graphdef_of(cfg), params)
    tokens = np.random.default_rng(0).integers(0, 300, size=(2, 16))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    logits, _ = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(16), (2, 16)))
    assert float(np.max(np.abs(np.asarray(logits) - ref))) <= 1e-4
    capsys.readouterr()
    for extra in ([], ["--speculative", "--draft_granularity", "4"], ["--decoder", "mfs", "--beams", "2",
                                                                       "--samples", "2", "--step_tokens", "4"]):
        sample_cli.main(["--workdir", out, "--prompt", "the quick", "--max_new_tokens", "6", "--json", *extra])
        res = json.loads(capsys.readouterr().out)
        assert len(res["text"]) == 1, extra


def test_convert_cli_bad_input_one_line_errors(hf_dir, tmp_path, capsys):
    import json
    import shutil

    d, _ = hf_dir
    cases = {}
    missing = tmp_path / "missing"
    shutil.copytree(d, missing)
    (missing / "tokenizer.model").unlink()
    cases["missing"] = (missing, "tokenizer.model not found")
    for name, change, msg in [("llama", {"model_type": "llama"}, "unsupported architecture 'llama'"),
                              ("mismatch", {"intermediate_size": 96}, "has shape"),
                              ("vocab", {"vocab_size": 301}, "tokenizer.model has 300 pieces")]:
        bad = tmp_path / name
        shutil.copytree(d, bad)
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(cfg | change))
        cases[name] = (bad, msg)
    for name, (src, msg) in cases.items():
        code = _convert("--hf_dir", str(src), "--out", str(tmp_path / f"out_{name}"))
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (name, err)


def test_convert_with_a_config_then_training_continues(hf_dir, tmp_path, data_dir, capsys):
    """`spark.convert --config FILE`: the checkpoint carries that config (non-shape fields differ from
    the HF-derived one: matformer, dtype), train.py with the same FILE resumes from it (fresh optimizer,
    the converted weights, not a new init); a config whose shapes differ is a one-line error."""
    import jax

    from spark.checkpoint import config_json
    from spark.train import load_checkpoint, run

    d, _ = hf_dir
    cfg_file = tmp_path / "tiny_gemma.py"
    cfg_file.write_text(f'''
from spark.config import Config, DataConfig, MatFormerConfig, ModelConfig, TrainConfig

def get_config(ffn_dim=128):
    model = ModelConfig(vocab_size=300, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        ffn_dim=ffn_dim, sliding_window=6, query_pre_attn_scalar=16.0, max_seq_len=64,
                        matformer=MatFormerConfig((1,)), dtype="bfloat16")
    data = DataConfig(data_dir={data_dir!r}, tokenizer="sentencepiece", spm_train=False)
    return Config(model=model, data=data, train=TrainConfig(steps=2, batch_size=8, seq_len=32, lr=1e-3,
                                                            warmup_steps=0, matformer_mode="off", log_every=1))
''')
    out = str(tmp_path / "w")
    assert _convert("--hf_dir", str(d), "--out", out, "--config", str(cfg_file)) == 0
    saved, converted, step = load_checkpoint(out)
    from spark.cli import load_config_file

    cfg = load_config_file(str(cfg_file))
    assert step == 0 and config_json(saved) == config_json(cfg)
    capsys.readouterr()
    run(cfg, out, progress=False)
    err = capsys.readouterr().err
    assert "resuming from step 0" in err and "note:" not in err
    _, trained, step = load_checkpoint(out)
    assert step == 2
    moved = max(float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(converted), strict=True))
    assert 0 < moved <= 3e-3  # two AdamW steps of lr 1e-3 from the converted weights, not a new init
    bad = tmp_path / "bad.py"
    bad.write_text(cfg_file.read_text().replace("ffn_dim=128", "ffn_dim=96"))
    assert _convert("--hf_dir", str(d), "--out", str(tmp_path / "w2"), "--config", str(bad)) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "model differs in ffn_dim" in err and len(err.strip().splitlines()) == 1

"""Import Hugging Face Gemma-2 weights (`Gemma2ForCausalLM` state dict or safetensors files).

    python -m spark.convert --hf_dir gemma-2-2b/ --out runs/gemma2_2b      # then: sample.py --workdir …
    python -m spark.convert --hf_dir gemma-2-2b/ --out gs://B/run --config configs/gemma2_2b.py
    python train.py --config configs/gemma2_2b.py --workdir gs://B/run --config.data.name=…   # continues

turns a local HF checkpoint directory (config.json, *.safetensors, tokenizer.model) into a training
workdir of this project (local or gs://): a params-only step-0 checkpoint (training from it starts a
fresh optimizer state) and WORKDIR/tokenizer.model. With --config the checkpoint carries that
config (its layer_pattern, matformer, dtype, data and train settings), so train.py with the same
config continues from it; the HF weights must have its parameter shapes. As a library:

    cfg = config_from_hf(json.load(open("config.json")))
    model = Transformer(cfg, nnx.Rngs(0))
    load_state_dict(model, state_dict)         # torch tensors or numpy arrays, HF key names

HF stores Linear weights as [out, in]; this model keeps every FFN matrix neuron-major [F, D] and
attention as [D, N, H] / [N, H, D].
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import jax.numpy as jnp
import numpy as np

from spark.config import ModelConfig
from spark.errors import ConfigError


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """ModelConfig of the dense Gemma-2 baseline from an HF Gemma2 config dict."""
    arch = hf.get("model_type", "")
    if arch != "gemma2":
        raise ConfigError(f"unsupported architecture {arch!r}: only model_type 'gemma2' can be imported")
    n_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(n_layers)]
    pattern = tuple("local" if t == "sliding_attention" else "global" for t in types)
    rope = hf.get("rope_parameters") or {}
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"unsupported activation {act!r}: Gemma-2 uses gelu_pytorch_tanh")
    kw = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=n_layers,
        num_heads=hf["num_attention_heads"], num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"], ffn_dim=hf["intermediate_size"], layer_pattern=pattern,
        sliding_window=hf["sliding_window"], max_seq_len=hf.get("max_position_embeddings", 8192),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        rms_eps=hf["rms_norm_eps"], ffn_kind="geglu", attn_kind="dense",
    )
    kw.update(overrides)
    return ModelConfig(**kw)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, np.float32)


def params_from_state_dict(cfg: ModelConfig, sd: dict) -> dict:
    """Nested dict of numpy arrays in this model's parameter layout."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    n, kh, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model

    def get(key, shape):
        if key not in sd:
            raise ConfigError(f"checkpoint is missing weight {key!r}")
        a = _np(sd[key])
        if a.shape != shape:
            raise ConfigError(f"weight {key!r} has shape {a.shape}, config expects {shape}")
        return a

    layers = {}
    for i in range(cfg.num_layers):
        p, f = f"layers.{i}.", cfg.ffn_width(i)
        layers[i] = {
            "pre_attn_norm": {"scale": get(p + "input_layernorm.weight", (d,))},
            "post_attn_norm": {"scale": get(p + "post_attention_layernorm.weight", (d,))},
            "pre_ffw_norm": {"scale": get(p + "pre_feedforward_layernorm.weight", (d,))},
            "post_ffw_norm": {"scale": get(p + "post_feedforward_layernorm.weight", (d,))},
            "attn": {
                "w_q": get(p + "self_attn.q_proj.weight", (n * h, d)).reshape(n, h, d).transpose(2, 0, 1),
                "w_k": get(p + "self_attn.k_proj.weight", (kh * h, d)).reshape(kh, h, d).transpose(2, 0, 1),
                "w_v": get(p + "self_attn.v_proj.weight", (kh * h, d)).reshape(kh, h, d).transpose(2, 0, 1),
                "w_o": get(p + "self_attn.o_proj.weight", (d, n * h)).reshape(d, n, h).transpose(1, 2, 0),
            },
            "ffn": {
                "w_gate": get(p + "mlp.gate_proj.weight", (f, d)),
                "w_up": get(p + "mlp.up_proj.weight", (f, d)),
                "w_down": get(p + "mlp.down_proj.weight", (d, f)).T,
            },
        }
    return {"embed": get("embed_tokens.weight", (cfg.vocab_size, d)),
            "final_norm": {"scale": get("norm.weight", (d,))}, "layers": layers}


def load_state_dict(model, sd: dict) -> None:
    """Overwrite `model`'s parameters (in place) with an HF Gemma-2 state dict."""
    cfg = model.cfg
    if cfg.ffn_kind != "geglu" or cfg.attn_kind != "dense":
        raise ConfigError("HF Gemma-2 weights load into the dense GeGLU baseline only")
    _assign(model, params_from_state_dict(cfg, sd))


def _assign(node, tree: dict) -> None:
    for key, val in tree.items():
        child = node[key] if isinstance(key, int) else getattr(node, key)
        if isinstance(val, dict):
            _assign(child, val)
        else:
            child.set_value(jnp.asarray(val, child.get_value().dtype))


def read_safetensors_dir(path: str) -> dict:
    """All tensors of the *.safetensors files in an HF checkpoint directory (as numpy float32)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"no *.safetensors files in {path}")
    sd = {}
    for fn in files:
        with safe_open(fn, framework="numpy") as f:
            for key in f.keys():
                sd[key] = f.get_tensor(key)
    return sd


REQUIRED = ("config.json", "tokenizer.model")


def convert_dir(hf_dir: str, out: str, dtype: str = "float32", config: str | None = None) -> str:
    """HF Gemma-2 directory -> training workdir (checkpoint step 0 + tokenizer.model); returns out.
    config: a config file whose model the weights load into (shape fields must agree with the HF
    config.json; `dtype` is then the config's own)."""
    import jax

    from spark import checkpoint, paths, train_lib
    from spark.cli import load_config_file
    from spark.config import Config, DataConfig
    from spark.data.tokenizer import SentencePieceTokenizer

    if not os.path.isdir(hf_dir):
        raise ConfigError(f"--hf_dir {hf_dir!r} is not a directory")
    for name in REQUIRED:
        if not os.path.isfile(os.path.join(hf_dir, name)):
            raise ConfigError(f"{os.path.join(hf_dir, name)} not found (an HF Gemma-2 directory has "
                              f"{', '.join(REQUIRED)} and *.safetensors)")
    with open(os.path.join(hf_dir, "config.json")) as f:
        model_cfg = config_from_hf(json.load(f), dtype=dtype)
    tok = SentencePieceTokenizer(os.path.join(hf_dir, "tokenizer.model"))
    if tok.vocab_size != model_cfg.vocab_size:
        raise ConfigError(f"tokenizer.model has {tok.vocab_size} pieces but config.json says vocab_size "
                          f"{model_cfg.vocab_size}")
    if config is None:
        cfg = Config(model=model_cfg, data=DataConfig(tokenizer="sentencepiece"))
    else:
        cfg = load_config_file(config)
        shapes, _ = checkpoint.model_differences(checkpoint.config_json(Config(model=model_cfg)), cfg)
        if shapes:
            raise ConfigError(f"the weights in {hf_dir} do not fit {config}: model differs in {', '.join(shapes)}")
        if cfg.model.ffn_kind != "geglu" or cfg.model.attn_kind != "dense":
            raise ConfigError(f"{config} is not the dense GeGLU model HF Gemma-2 weights load into")
    params = params_from_state_dict(model_cfg, read_safetensors_dir(hf_dir))
    abstract = jax.eval_shape(lambda: train_lib.init_state(cfg))["params"]
    params = _like(abstract, params)
    state = {"params": params}  # params only: training from it starts a fresh optimizer state
    root = paths.path(out)
    if (root / "checkpoints").exists():
        raise ConfigError(f"{out!r} already holds checkpoints; convert into a new directory")
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(paths.path(os.path.join(hf_dir, "tokenizer.model")).read_bytes())
    ck = checkpoint.Checkpointer(root / "checkpoints", async_save=False)
    ck.save(0, state, {}, cfg)
    ck.close()
    return out


def _like(abstract, tree):
    """`tree` (nested dicts of numpy arrays) as jax arrays in the model's parameter structure and dtypes."""
    import jax

    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def one(path, a):
        key = jax.tree_util.keystr(path)
        if key not in flat:
            raise ConfigError(f"the converted weights have no parameter {key}")
        return jnp.asarray(flat[key], a.dtype)

    return jax.tree_util.tree_map_with_path(one, abstract)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a local Hugging Face Gemma-2 checkpoint into a workdir.")
    ap.add_argument("--hf_dir", required=True, help="config.json + *.safetensors + tokenizer.model")
    ap.add_argument("--out", required=True, help="the new workdir (sample.py --workdir OUT)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype (without --config)")
    ap.add_argument("--config", help="a config file to continue training with (e.g. configs/gemma2_2b.py): the "
                                     "checkpoint carries it, so train.py --config FILE --workdir OUT resumes")
    args = ap.parse_args(argv)
    out = convert_dir(args.hf_dir, args.out, args.dtype, args.config)
    print(f"wrote {out} (checkpoint step 0, tokenizer.model)")


if __name__ == "__main__":
    from spark.cli import main_guard

    main_guard(main)

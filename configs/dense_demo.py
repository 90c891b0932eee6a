"""The dense Gemma-2 baseline of cpu_demo: same shapes and parameter count, GeGLU + dense attention.

    python train.py --config configs/dense_demo.py --workdir runs/dense_demo
"""

import dataclasses
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("cpu_demo", os.path.join(os.path.dirname(__file__), "cpu_demo.py"))
cpu_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_demo)


def get_config():
    cfg = cpu_demo.get_config()
    model = cpu_demo.model_config(ffn_kind="geglu", attn_kind="dense")
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, matformer_mode="off"))

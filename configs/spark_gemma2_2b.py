"""Spark Gemma-2 2B + MatFormer: Spark FFN (13824 neurons, 8% active, predictor rank 1024) and
Spark attention (≤ 256 keys per query, rank 128), granularities F/8..F. Same parameter count as
configs/gemma2_2b.py.

    python train.py --config configs/spark_gemma2_2b.py --workdir gs://BUCKET/spark_2b --distributed
"""

import dataclasses
import importlib.util
import os

from spark.config import MatFormerConfig, SparkConfig

_spec = importlib.util.spec_from_file_location("gemma2_2b", os.path.join(os.path.dirname(__file__), "gemma2_2b.py"))
gemma2_2b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemma2_2b)


def get_config():
    cfg = gemma2_2b.get_config()
    model = gemma2_2b.model_config(
        ffn_kind="spark", attn_kind="spark", matformer=MatFormerConfig((8, 4, 2, 1)),
        spark=SparkConfig(ffn_k_frac=0.08, ffn_rank=1024, attn_k=256, attn_rank=128))
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, matformer_mode="sample"))

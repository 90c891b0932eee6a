"""A small dense decoder trained on the modchain task (spark/tasks/modchain.py) for the search decoders.

    python train.py --config configs/reasoning_modchain.py --workdir runs/reasoning_modchain

Checkpoints (every 10 steps) are all kept; bench/reasoning.py picks, on the validation split,
the one whose greedy accuracy lies in 20–70%.
"""

from spark.tasks import train_config


def get_config():
    return train_config("modchain", steps=400, ckpt_every=10)  # learnt in a jump (10% -> 93% in 50 steps)

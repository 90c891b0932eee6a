"""A small dense decoder trained on the pathfind task (spark/tasks/pathfind.py) for the search decoders.

    python train.py --config configs/reasoning_pathfind.py --workdir runs/reasoning_pathfind

Checkpoints (every 250 steps) are all kept; bench/reasoning.py picks, on the validation split,
the one whose greedy accuracy lies in 20–70%.
"""

from spark.tasks import train_config


def get_config():
    return train_config("pathfind", steps=3000)

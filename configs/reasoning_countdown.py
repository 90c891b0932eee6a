"""A small dense decoder trained on the countdown task (spark/tasks/countdown.py) for the search decoders.

    python train.py --config configs/reasoning_countdown.py --workdir runs/reasoning_countdown

Checkpoints (every 250 steps) are all kept; bench/reasoning.py picks, on the validation split,
the one whose greedy accuracy lies in 20–70%.
"""

from spark.tasks import train_config


def get_config():
    return train_config("countdown", steps=1500)

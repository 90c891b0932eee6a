"""The countdown decoder of configs/reasoning_countdown.py trained with MatFormer 'sample' mode, so
that its F/8, F/4 and F/2 FFN prefixes are models too: the self-drafts of the speculative benches
on a reasoning task (bench/multidraft.py --task countdown).

    python train.py --config configs/reasoning_countdown_matformer.py \\
        --workdir runs/reasoning_countdown_matformer
"""

from spark.tasks import train_config


def get_config():
    # 'sample' trains one width per step, so the full width sees ~1/4 of the updates: twice the
    # dense recipe's steps
    return train_config("countdown", steps=3000, ckpt_every=500, matformer_mode="sample")

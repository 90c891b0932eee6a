"""Verifiable reasoning tasks for the search decoders (decode/search.py): generators with a
deterministic index -> instance map per split, verifiers, and solvers that say whether a partial
solution can still succeed (the label of the foresight diagnostics).

    from spark import tasks
    task = tasks.get("countdown")
    inst = tasks.instance(task, "validation", 7)     # Instance(prompt, solution, key)
    task.verify(inst, generated_ids)                  # exact check of a generated solution
"""

from __future__ import annotations

from spark.errors import ConfigError
from spark.tasks.common import Instance, instance, split_of
from spark.tasks.countdown import Countdown
from spark.tasks.modchain import ModChain
from spark.tasks.pathfind import PathFind
from spark.tasks.vocab import TaskTokenizer

TASKS = {"countdown": Countdown(), "pathfind": PathFind(), "modchain": ModChain()}

__all__ = ["TASKS", "Instance", "TaskTokenizer", "get", "instance", "split_of", "source"]


def get(name: str):
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


class Source:
    """A random-access grain source of one split's instances as text (prompt, solution, text =
    both). Train is effectively unbounded; validation and test hold `size` fixed instances."""

    def __init__(self, task, split: str, size: int, seed: int = 0):
        self.task, self.split, self.size, self.seed = task, split, size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        inst = instance(self.task, self.split, int(i), self.seed)
        return {"prompt": inst.prompt, "solution": inst.solution, "text": inst.prompt + " " + inst.solution}


def source(name: str, split: str, seed: int = 0) -> Source:
    return Source(get(name), split, 10_000_000 if split == "train" else 2_000, seed)


def train_config(task: str, *, steps: int, lr: float = 2e-3, d_model: int = 128, num_layers: int = 4,
                 seq_len: int = 128, batch_size: int = 32, ckpt_every: int = 250, matformer_mode: str = "off"):
    """The shared recipe of configs/reasoning_*.py: a small dense decoder trained on one task's
    generated solutions (loss on the solution), a checkpoint kept every `ckpt_every` steps so
    bench/reasoning.py can pick the one whose validation greedy accuracy lies in 20–70%.
    `matformer_mode` 'sample' trains the nested FFN widths too (the self-drafts of bench/multidraft.py)."""
    from spark.config import Config, DataConfig, ModelConfig, TrainConfig

    get(task)
    model = ModelConfig(vocab_size=TaskTokenizer.vocab_size, d_model=d_model, num_layers=num_layers, num_heads=4,
                        num_kv_heads=2, head_dim=d_model // 4, ffn_dim=4 * d_model, sliding_window=seq_len,
                        ffn_kind="geglu", attn_kind="dense", max_seq_len=seq_len)
    train = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=steps // 20,
                        log_every=50, eval_every=ckpt_every, eval_batches=4, ckpt_every=ckpt_every,
                        keep_ckpts=steps // ckpt_every + 1, matformer_mode=matformer_mode)
    return Config(model=model, train=train, data=DataConfig(name=task, tokenizer="task"))

"""A modular-arithmetic chain, the negative control: x0 and k operations mod p (13); one step writes
one intermediate value, the answer is the last. Nothing branches, so there is nothing to plan:
errors are confident slips that later steps stay consistent with, and self-likelihood foresight
should not beat sampling + voting by more than noise.

    prompt   "9 + 7 * 3 - 5 mod 13 |"
    solution "3 ; 9 ; 4"   (then <eos>)
"""

from __future__ import annotations

import dataclasses

from spark.tasks.common import Instance, take_words

OPS = {"+": lambda a, b, p: (a + b) % p, "-": lambda a, b, p: (a - b) % p, "*": lambda a, b, p: (a * b) % p}


@dataclasses.dataclass(frozen=True)
class ModChain:
    ops: int = 4
    p: int = 13  # small enough for a tiny model to learn the tables in minutes
    name: str = "modchain"
    step_tokens: int = 4  # search budget: a step's tokens, a whole solution's
    max_gen: int = 16
    answer_span: str = "last_step"

    def sample(self, rng) -> Instance:
        x = int(rng.integers(self.p))
        chain = [(str(rng.choice(list(OPS))), int(rng.integers(1, self.p))) for _ in range(self.ops)]
        values, v = [], x
        for op, a in chain:
            v = OPS[op](v, a, self.p)
            values.append(v)
        prompt = f"{x} " + " ".join(f"{op} {a}" for op, a in chain) + f" mod {self.p} |"
        return Instance(prompt=prompt, solution=" ; ".join(map(str, values)), key=(x, tuple(chain)))

    def answer(self, inst: Instance) -> int:
        x, chain = inst.key
        for op, a in chain:
            x = OPS[op](x, a, self.p)
        return x

    def verify(self, inst: Instance, ids) -> bool:
        """Answer-only: the last step's value is the chain's result."""
        steps = take_words(ids)
        return bool(steps) and steps[-1] == [str(self.answer(inst))]

    def solvable_after(self, inst: Instance, ids) -> bool | None:
        """Every intermediate so far is right (a wrong one is carried to the end)."""
        x, chain = inst.key
        steps = take_words(ids, partial=True) or []
        for words, (op, a) in zip(steps, chain, strict=False):
            x = OPS[op](x, a, self.p)
            if words != [str(x)]:
                return False
        return True

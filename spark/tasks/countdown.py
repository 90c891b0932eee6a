"""Countdown: k numbers and a target; one operation per step ("a op b = c"), each number used
once, the last result equal to the target. A wrong early operation can leave the target
unreachable: the task rewards looking ahead.

    prompt   "4 6 9 12 goal 27 |"
    solution "6 * 4 = 24 ; 24 + 12 = 36 ; 36 - 9 = 27"   (then <eos>)

Operands are written larger first; results are positive integers <= max_value (exact division
only). The training solution is drawn uniformly from all solutions (so the policy is
multimodal); the target comes from a random derivation and is kept when its share of dead-end
first moves lies in [dead_lo, dead_hi] (measured by the solver), so the first step matters.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

from spark.tasks.common import Instance, take_words

OPS = ("+", "-", "*", "/")


def apply(a: int, op: str, b: int, max_value: int) -> int | None:
    """a op b for a >= b, or None when not allowed (non-positive, inexact, too large)."""
    if a < b:
        return None
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else 0}[op]
    return c if 1 <= c <= max_value else None


def moves(pool: tuple[int, ...], max_value: int):
    """Every (a, op, b, c, rest) one step can make from a pool of numbers."""
    seen = set()
    for i, j in itertools.combinations(range(len(pool)), 2):
        a, b = max(pool[i], pool[j]), min(pool[i], pool[j])
        rest = tuple(x for k, x in enumerate(pool) if k not in (i, j))
        for op in OPS:
            c = apply(a, op, b, max_value)
            if c is not None and (a, op, b) not in seen:
                seen.add((a, op, b))
                yield a, op, b, c, rest


@functools.lru_cache(maxsize=200_000)
def solutions(pool: tuple[int, ...], target: int, max_value: int) -> tuple:
    """All step sequences that reduce the (sorted) pool to exactly [target]."""
    if len(pool) == 1:
        return ((),) if pool[0] == target else ()
    out = []
    for a, op, b, c, rest in moves(pool, max_value):
        for tail in solutions(tuple(sorted(rest + (c,))), target, max_value):
            out.append(((a, op, b, c),) + tail)
    return tuple(out)


def dead_end_share(pool: tuple[int, ...], target: int, max_value: int) -> float:
    """The share of first moves after which the target is unreachable."""
    first = list(moves(pool, max_value))
    dead = sum(not solutions(tuple(sorted(rest + (c,))), target, max_value) for _, _, _, c, rest in first)
    return dead / max(len(first), 1)


@dataclasses.dataclass(frozen=True)
class Countdown:
    k: int = 4
    lo: int = 1
    hi: int = 25
    max_value: int = 200
    dead_lo: float = 0.3
    dead_hi: float = 0.7
    name: str = "countdown"
    step_tokens: int = 8  # search budget: a step's tokens, a whole solution's
    max_gen: int = 24
    answer_span: str = "all"

    def sample(self, rng) -> Instance:
        while True:  # a random derivation gives a reachable target; keep it if its dead-end share fits
            pool = tuple(sorted(int(x) for x in rng.integers(self.lo, self.hi + 1, self.k)))
            left = list(pool)
            while len(left) > 1:
                options = list(moves(tuple(sorted(left)), self.max_value))
                if not options:
                    break
                *_, c, rest = options[int(rng.integers(len(options)))]
                left = [*rest, c]
            if len(left) == 1 and self.dead_lo <= dead_end_share(pool, left[0], self.max_value) <= self.dead_hi:
                break
        target = left[0]
        sols = solutions(pool, target, self.max_value)
        sol = sols[int(rng.integers(len(sols)))]
        prompt = " ".join(map(str, pool)) + f" goal {target} |"
        text = " ; ".join(f"{a} {op} {b} = {c}" for a, op, b, c in sol)
        return Instance(prompt=prompt, solution=text, key=(pool, target))

    def verify(self, inst: Instance, ids) -> bool:
        pool, target = inst.key
        steps = take_words(ids)
        if steps is None or len(steps) != len(pool) - 1:
            return False
        return self._play(pool, steps) == [target]

    def solvable_after(self, inst: Instance, ids) -> bool | None:
        """Whether a valid partial solution (whole steps) can still reach the target; None if the
        steps so far are not valid moves."""
        pool, target = inst.key
        left = self._play(pool, take_words(ids, partial=True) or [])
        return None if left is None else bool(solutions(tuple(sorted(left)), target, self.max_value))

    def _play(self, pool, steps) -> list[int] | None:
        """The numbers left after the steps ("a op b = c", each a valid move on what is left), or
        None at the first malformed or invalid step."""
        left = list(pool)
        for words in steps:
            if len(words) != 5 or words[3] != "=" or words[1] not in OPS:
                return None
            try:
                a, b, c = int(words[0]), int(words[2]), int(words[4])
            except ValueError:
                return None
            if apply(a, words[1], b, self.max_value) != c:
                return None
            for x in (a, b):
                if x not in left:
                    return None
                left.remove(x)
            left.append(c)
        return left

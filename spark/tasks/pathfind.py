"""Graph path-finding with dead-end branches: from the start node `arms` chains lead away; only
one reaches the goal, the others end in dead ends of similar length (so length cannot cue the
end). One node per step. The branch choice at the start needs lookahead (Bachmann & Nagarajan
2024, arXiv 2403.06963); following a wrong arm ends at a leaf with no edge out.

    prompt   "start 4 goal 9 | 4 17 , 31 9 , 4 31 , 17 2 , … |"   (directed edges u v, shuffled)
    solution "31 ; 9"   (then <eos>)
"""

from __future__ import annotations

import dataclasses

from spark.tasks.common import Instance, take_words


@dataclasses.dataclass(frozen=True)
class PathFind:
    arms: int = 3
    min_len: int = 2
    max_len: int = 4
    labels: int = 24  # node names are numbers 0..labels-1 (with 100, 1,500 steps did not learn edge-following)
    name: str = "pathfind"
    step_tokens: int = 4  # search budget: a step's tokens, a whole solution's
    max_gen: int = 16
    answer_span: str = "all"

    def sample(self, rng) -> Instance:
        lens = [int(x) for x in rng.integers(self.min_len, self.max_len + 1, self.arms)]
        nodes = [int(x) for x in rng.choice(self.labels, 1 + sum(lens), replace=False)]
        start, rest, arms = nodes[0], nodes[1:], []
        for n in lens:
            arms.append(rest[:n])
            rest = rest[n:]
        goal_arm = int(rng.integers(self.arms))
        edges = [(u, v) for arm in arms for u, v in zip([start] + arm[:-1], arm, strict=True)]
        edges = [edges[i] for i in rng.permutation(len(edges))]
        goal = arms[goal_arm][-1]
        prompt = f"start {start} goal {goal} | " + " , ".join(f"{u} {v}" for u, v in edges) + " |"
        return Instance(prompt=prompt, solution=" ; ".join(map(str, arms[goal_arm])),
                        key=(start, goal, tuple(sorted(edges))))

    def verify(self, inst: Instance, ids) -> bool:
        steps = take_words(ids)
        return steps is not None and self._walk(inst, steps) == "goal"

    def _walk(self, inst: Instance, steps) -> str:
        start, goal, edges = inst.key
        here, edges = start, set(edges)
        for words in steps:
            if len(words) != 1 or not words[0].isdigit() or (here, int(words[0])) not in edges:
                return "invalid"
            here = int(words[0])
        return "goal" if here == goal else "elsewhere"

    def solvable_after(self, inst: Instance, ids) -> bool | None:
        """Whether the goal is still reachable from where the whole steps so far lead."""
        steps = take_words(ids, partial=True) or []
        if self._walk(inst, steps) == "invalid":
            return None
        start, goal, edges = inst.key
        here = int(steps[-1][0]) if steps else start
        out = dict(edges)  # every node has at most one edge out, except the start
        if here == start:
            return True
        while here != goal and here in out:
            here = out[here]
        return here == goal

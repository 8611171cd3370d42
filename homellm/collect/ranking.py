"""Rankings of sibling replies merged into one order: the ranked-pairs method.

Open Assistant merges the volunteers' rankings of one message's replies with Tideman's ranked
pairs (backend/oasst_backend/utils/ranking.py, used by the tree manager's
`ranked_pairs_update`), over the replies every ranking contains:

1. for each pair of replies (a, b), count the rankings that put a above b;
2. take the pairs whose margin (a over b minus b over a) is >= 0, strongest margin first
   (ties: by the replies' order, below);
3. lock each pair in unless it closes a cycle with the pairs locked so far;
4. the order is the locked graph read from its sources: repeatedly the first reply that no
   remaining reply beats.

Ties are broken by the replies' ids, sorted (as OA sorts them), so the result depends only
on the rankings. A Condorcet winner always comes first, and a ranking everyone agrees on
comes back unchanged. Tideman (1987), "Independence of clones as a criterion for voting
rules".
"""
from __future__ import annotations

from typing import Hashable, Sequence


def ranked_pairs(rankings: Sequence[Sequence[Hashable]]) -> list:
    """One order (best first) of the items that all `rankings` (each best first) contain;
    [] when fewer than two are common to all."""
    if not rankings:
        return []
    common = set(rankings[0]).intersection(*map(set, rankings[1:]))
    if len(common) < 2:
        return sorted(common, key=str)
    items = sorted(common, key=str)
    index = {x: i for i, x in enumerate(items)}
    n = len(items)
    wins = [[0] * n for _ in range(n)]        # wins[i][j]: rankings with i above j
    for r in rankings:
        order = [index[x] for x in r if x in index]
        for a in range(n):
            for b in range(a + 1, n):
                wins[order[a]][order[b]] += 1
    pairs = sorted(((wins[i][j] - wins[j][i], i, j) for i in range(n) for j in range(n)
                    if i != j and wins[i][j] >= wins[j][i]), key=lambda p: (-p[0], p[1], p[2]))
    beats: list[set[int]] = [set() for _ in range(n)]   # locked edges i -> j
    for _, i, j in pairs:
        if not _reaches(beats, j, i):
            beats[i].add(j)
    remaining, out = set(range(n)), []
    while remaining:
        beaten = {j for i in remaining for j in beats[i]}
        first = min(remaining - beaten)       # there is one: the locked graph has no cycle
        out.append(items[first])
        remaining.remove(first)
    return out


def _reaches(beats: list[set[int]], start: int, goal: int) -> bool:
    seen, stack = {start}, [start]
    while stack:
        x = stack.pop()
        if x == goal:
            return True
        for y in beats[x] - seen:
            seen.add(y)
            stack.append(y)
    return False

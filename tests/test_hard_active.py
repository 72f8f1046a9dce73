"""Tests of ccnn.hard.active: Eq. 9 scores, random / mined / persistent active constraints."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ccnn.hard.active import (
    MinedActive,
    PersistentActive,
    RandomActive,
    median_violation,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Table:
    """A violation callable over a fixed (pool_size, N_C) table that records its queries."""

    def __init__(self, C: np.ndarray) -> None:
        self.C = torch.as_tensor(np.asarray(C, dtype=np.float64))
        self.calls: list[list[int]] = []

    def set(self, C: np.ndarray) -> Table:
        self.C = torch.as_tensor(np.asarray(C, dtype=np.float64))
        return self

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.calls.append(idx.tolist())
        return self.C[idx]


def from_scores(s) -> np.ndarray:
    """A (K, 3) residual table whose Eq. 9 score (median_j |C_jk|) is s_k."""
    s = np.asarray(s, dtype=np.float64)
    return np.stack([s, -s, 10 * s + 1], axis=1)


def never(idx: torch.Tensor) -> torch.Tensor:
    raise AssertionError("violation must not be called")


# ---- median_violation --------------------------------------------------------------------------


@pytest.mark.parametrize("nc", [1, 4, 5, 6])
def test_median_violation_matches_numpy(nc: int) -> None:
    C = np.random.default_rng(nc).normal(size=(7, nc))
    got = median_violation(torch.as_tensor(C)).numpy()
    np.testing.assert_allclose(got, np.median(np.abs(C), axis=1), rtol=0, atol=1e-15)
    got = median_violation(torch.as_tensor(C), inequality=True).numpy()
    np.testing.assert_allclose(got, np.median(np.maximum(C, 0), axis=1), rtol=0, atol=1e-15)


def test_median_violation_batched_and_errors() -> None:
    C = np.random.default_rng(1).normal(size=(2, 3, 6))
    got = median_violation(torch.as_tensor(C)).numpy()
    np.testing.assert_allclose(got, np.median(np.abs(C), axis=-1), atol=1e-15)
    with pytest.raises(ValueError, match="floating-point"):
        median_violation(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="N_C >= 1"):
        median_violation(torch.tensor(1.0))
    with pytest.raises(ValueError, match="N_C >= 1"):
        median_violation(torch.ones(3, 0))


# ---- RandomActive ------------------------------------------------------------------------------


def test_random_active_distinct_in_range_reproducible() -> None:
    a = RandomActive(50, 12, generator=gen(3))
    b = RandomActive(50, 12, generator=gen(3))
    c = RandomActive(50, 12, generator=gen(4))
    seq_a = [a.select(never) for _ in range(20)]
    seq_b = [b.select(never) for _ in range(20)]
    seq_c = [c.select(never) for _ in range(20)]
    for idx in seq_a:
        assert idx.dtype == torch.long and idx.shape == (12,)
        assert len(set(idx.tolist())) == 12
        assert int(idx.min()) >= 0 and int(idx.max()) < 50
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(seq_a, seq_c, strict=True))
    assert len({tuple(sorted(x.tolist())) for x in seq_a}) > 1  # a new subset at every step
    assert a.t == 20
    # k = pool_size returns a permutation of the pool
    full = RandomActive(9, 9, generator=gen()).select(never)
    assert sorted(full.tolist()) == list(range(9))


def test_random_active_inequality_keeps_violated_of_the_draw() -> None:
    C = np.array([[-1.0, -2.0, -3.0], [0.5, 2.0, -1.0], [3.0, -1.0, -2.0], [1.0, 1.0, 1.0]] * 3)
    table = Table(C)
    sel = RandomActive(12, 7, generator=gen(5), inequality=True)
    for _ in range(5):
        idx = sel.select(table)
        drawn = table.calls[-1]
        score = np.median(np.maximum(C[drawn], 0), axis=1)
        assert len(drawn) == 7
        assert idx.tolist() == [k for k, s in zip(drawn, score, strict=True) if s > 0]
        assert all(k % 4 in (1, 3) for k in idx.tolist())


# ---- MinedActive -------------------------------------------------------------------------------


def test_mined_active_whole_pool_is_top_k() -> None:
    rng = np.random.default_rng(7)
    C = rng.normal(size=(30, 6))
    table = Table(C)
    sel = MinedActive(30, 5, candidates=30, generator=gen())
    idx = sel.select(table)
    assert table.calls == [list(range(30))]
    expect = np.argsort(-np.median(np.abs(C), axis=1), kind="stable")[:5]
    assert idx.tolist() == expect.tolist()
    # candidates beyond the pool size also score the whole pool
    idx2 = MinedActive(30, 5, candidates=1000, generator=gen(9)).select(Table(C))
    assert idx2.tolist() == expect.tolist()


def test_mined_active_known_table() -> None:
    # Eq. 9 scores by hand: medians of |C| per row.
    C = np.array(
        [
            [0.1, -0.2, 0.3],  # 0.2
            [5.0, -0.1, 0.0],  # 0.1
            [-1.0, 2.0, -3.0],  # 2.0
            [0.4, 0.4, -9.0],  # 0.4
            [1.5, -1.5, 0.0],  # 1.5
            [0.0, 0.0, 7.0],  # 0.0
        ]
    )
    idx = MinedActive(6, 3, candidates=6, generator=gen()).select(Table(C))
    assert idx.tolist() == [2, 4, 3]


def test_mined_active_random_candidates() -> None:
    rng = np.random.default_rng(11)
    C = rng.normal(size=(200, 6))
    table = Table(C)
    sel = MinedActive(200, 16, candidates=40, generator=gen(2))
    seen = set()
    for _ in range(4):
        idx = sel.select(table)
        cand = np.array(table.calls[-1])
        assert len(cand) == 40 and len(set(cand.tolist())) == 40
        assert cand.min() >= 0 and cand.max() < 200
        order = np.argsort(-np.median(np.abs(C[cand]), axis=1), kind="stable")[:16]
        assert idx.tolist() == cand[order].tolist()
        seen.add(tuple(cand.tolist()))
    assert len(seen) == 4
    assert len(table.calls) == 4  # one evaluation per step


def test_mined_active_inequality_only_violated() -> None:
    C = np.array(
        [
            [-1.0, -1.0, 5.0],  # median max(C,0) = 0
            [0.3, 0.2, -1.0],  # 0.2
            [2.0, 3.0, 1.0],  # 2.0
            [-0.5, -0.5, -0.5],  # 0
            [0.1, 0.1, 0.1],  # 0.1
        ]
    )
    idx = MinedActive(5, 2, candidates=5, generator=gen(), inequality=True).select(Table(C))
    assert idx.tolist() == [2, 1]
    idx = MinedActive(5, 5, candidates=5, generator=gen(), inequality=True).select(Table(C))
    assert idx.tolist() == [2, 1, 4]  # the satisfied rows 0 and 3 are never chosen


# ---- PersistentActive --------------------------------------------------------------------------


def test_persistent_scripted_sequence() -> None:
    """Mined additions over all non-members (no randomness), budget 4, tol 0.1; all by hand."""
    sel = PersistentActive(8, 2, 4, tol=0.1, candidates=8, generator=gen())
    table = Table(from_scores(np.zeros(8)))

    # step 0: add the two most violated (0, 1); both violated
    out = sel.select(table.set(from_scores([0.9, 0.8, 0.5, 0.4, 0.3, 0.2, 0.15, 0.12])))
    assert out.tolist() == [0, 1] and sel.streaks.tolist() == [0, 0]
    assert (sel.last_added, sel.last_evicted) == (2, 0)

    # step 1: add 2, 3; 0 is satisfied (streak 1); 4 members = budget, nothing evicted
    out = sel.select(table.set(from_scores([0.05, 0.7, 0.6, 0.5, 0.3, 0.2, 0.15, 0.12])))
    assert table.calls[-1] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert out.tolist() == [0, 1, 2, 3] and sel.streaks.tolist() == [1, 0, 0, 0]
    assert sel.added_at.tolist() == [0, 0, 1, 1]

    # step 2: add 4, 5; satisfied: 0 (streak 2), 1 (score = tol: streak 1), 2 (streak 1).
    # Evict 2: 0 (longest streak), then 1 (tie with 2 at streak 1; 1 is older).
    out = sel.select(table.set(from_scores([0.02, 0.1, 0.03, 0.5, 0.9, 0.8, 0.01, 0.0])))
    assert sel.evicted.tolist() == [0, 1]
    assert out.tolist() == [2, 3, 4, 5] and sel.streaks.tolist() == [1, 0, 0, 0]

    # step 3: add 6, 7 (0 and 1 are candidates again); 2 is violated again (streak reset)
    # although older than 3 and 4, it stays; 3 and 4 (satisfied, streak 1) go, oldest first.
    out = sel.select(table.set(from_scores([0.3, 0.2, 0.4, 0.05, 0.0, 0.6, 0.7, 0.65])))
    assert table.calls[-1] == [2, 3, 4, 5, 0, 1, 6, 7]
    assert sel.evicted.tolist() == [3, 4]
    assert out.tolist() == [2, 5, 6, 7] and sel.streaks.tolist() == [0, 0, 0, 0]
    np.testing.assert_allclose(sel.member_violation.numpy(), [0.4, 0.6, 0.7, 0.65])
    assert (sel.total_added, sel.total_evicted, sel.t) == (8, 4, 4)


def _with_state(sel: PersistentActive, members, added_at, streaks, t) -> None:
    state = sel.state_dict()
    n = len(members)
    state.update(
        members=torch.tensor(members),
        added_at=torch.tensor(added_at),
        streaks=torch.tensor(streaks),
        scores=torch.zeros(n, dtype=F64),
        t=t,
    )
    sel.load_state_dict(state)


def test_persistent_evicts_longest_streak_before_oldest() -> None:
    sel = PersistentActive(20, 2, 4, tol=0.1, candidates=20, generator=gen())
    _with_state(sel, [10, 11, 12, 13], [0, 1, 2, 3], [1, 3, 3, 0], t=4)
    s = np.full(20, 0.01)
    s[[14, 15]] = [0.9, 0.8]  # the two additions
    s[13] = 0.5  # violated
    out = sel.select(Table(from_scores(s)))
    # streaks before eviction: 10:2 11:4 12:4 13:0 14:0 15:0 -> evict 11, 12 (tie: 11 older)
    assert sel.evicted.tolist() == [11, 12]
    assert out.tolist() == [10, 13, 14, 15]
    assert sel.streaks.tolist() == [2, 0, 0, 0]
    assert sel.added_at.tolist() == [0, 3, 4, 4]


def test_persistent_violated_evicted_only_when_no_satisfied_left() -> None:
    # One satisfied member, three evictions needed: it goes first, then the least violated.
    sel = PersistentActive(10, 3, 3, tol=0.1, candidates=10, generator=gen())
    _with_state(sel, [0, 1, 2], [0, 0, 1], [0, 0, 0], t=2)
    s = np.array([0.5, 0.05, 0.3, 0.9, 0.8, 0.7, 0.0, 0.0, 0.0, 0.0])
    out = sel.select(Table(from_scores(s)))
    assert sel.evicted.tolist() == [1, 2, 0]
    assert out.tolist() == [3, 4, 5]
    # all violated, ties in violation: the oldest goes first
    sel = PersistentActive(10, 2, 2, tol=0.1, candidates=10, generator=gen())
    _with_state(sel, [0, 1], [0, 1], [0, 0], t=2)
    s = np.array([0.5, 0.5, 0.0, 0.9, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0])
    out = sel.select(Table(from_scores(s)))
    assert sel.evicted.tolist() == [0, 1] and out.tolist() == [3, 4]


def reference_persistent(tables, k_new, budget, tol):
    """Plain-Python statement of the rule (mined over all non-members), step by step."""
    members: list[dict] = []
    history = []
    for t, s in enumerate(tables):
        ids = {m["k"] for m in members}
        outside = [k for k in range(len(s)) if k not in ids]
        new = sorted(outside, key=lambda k: -s[k])[:k_new]
        members += [{"k": k, "age": t, "streak": 0} for k in new]
        for m in members:
            m["streak"] = m["streak"] + 1 if s[m["k"]] <= tol else 0
        n_evict = max(len(members) - budget, 0)
        sat = [m for m in members if s[m["k"]] <= tol]
        vio = [m for m in members if s[m["k"]] > tol]
        order = sorted(sat, key=lambda m: (-m["streak"], m["age"]))
        order += sorted(vio, key=lambda m: (s[m["k"]], m["age"]))
        gone = {m["k"] for m in order[:n_evict]}
        members = [m for m in members if m["k"] not in gone]
        history.append(([m["k"] for m in members], [m["streak"] for m in members]))
    return history


def test_persistent_matches_reference_rule() -> None:
    rng = np.random.default_rng(0)
    # Each sample flips between satisfied (score 0 or tol) and violated with probability 0.2 per
    # step: long satisfied streaks, many ties in streak and in score (0.0 / 0.05).
    tables, sat = [], rng.random(15) < 0.5
    for _ in range(40):
        sat ^= rng.random(15) < 0.2
        low = rng.choice([0.0, 0.05], size=15)
        tables.append(np.where(sat, low, 0.2 + np.round(rng.random(15), 1)))
    ref = reference_persistent(tables, k_new=1, budget=9, tol=0.05)
    sel = PersistentActive(15, 1, 9, tol=0.05, candidates=15, generator=gen())
    table = Table(from_scores(tables[0]))
    for s, (members, streaks) in zip(tables, ref, strict=True):
        assert sel.select(table.set(from_scores(s))).tolist() == members
        assert sel.streaks.tolist() == streaks
    assert sel.total_evicted > 10 and max(max(h[1], default=0) for h in ref) >= 4


def test_persistent_random_additions_never_duplicate() -> None:
    rng = np.random.default_rng(3)
    table = Table(rng.normal(size=(12, 6)))
    sel = PersistentActive(12, 3, 7, tol=0.5, generator=gen(1))
    prev: list[int] = []
    for _ in range(15):
        table.set(rng.normal(size=(12, 6)) * rng.choice([0.1, 3.0], size=(12, 1)))
        out = sel.select(table).tolist()
        query = table.calls[-1]
        assert query[: len(prev)] == prev  # members first, then the random additions
        added = query[len(prev) :]
        assert len(added) == min(3, 12 - len(prev)) and not set(added) & set(prev)
        assert len(set(out)) == len(out) <= 7 and set(out) <= set(query)
        assert sel.last_added == len(added)
        prev = out


def test_persistent_inequality() -> None:
    # C <= 0 constraints: rows 0..3 violated (positive residuals), rows 4..7 satisfied.
    C = np.array([[1.0, 2.0, -1.0]] * 4 + [[-1.0, -2.0, 3.0]] * 4)
    C[:4] *= np.array([[1.0], [2.0], [3.0], [4.0]])
    table = Table(C)
    sel = PersistentActive(8, 3, 8, tol=0.0, candidates=8, generator=gen(), inequality=True)
    assert sel.select(table).tolist() == [3, 2, 1]
    assert sel.select(table).tolist() == [3, 2, 1, 0]  # only violated samples are added
    np.testing.assert_allclose(sel.member_violation.numpy(), [4.0, 3.0, 2.0, 1.0])
    rnd = PersistentActive(8, 4, 8, tol=0.0, generator=gen(2), inequality=True)
    for _ in range(4):
        assert set(rnd.select(table).tolist()) <= {0, 1, 2, 3}
    assert sorted(rnd.members.tolist()) == [0, 1, 2, 3]


def test_persistent_read_only_views() -> None:
    sel = PersistentActive(5, 2, 3, tol=0.1, candidates=5, generator=gen())
    sel.select(Table(from_scores([0.5, 0.4, 0.3, 0.2, 0.1])))
    sel.members[0] = 99
    sel.streaks[0] = 99
    assert sel.members.tolist() == [0, 1] and sel.streaks.tolist() == [0, 0]


# ---- state_dict --------------------------------------------------------------------------------


def _make(kind: str, seed: int):
    return {
        "random": lambda: RandomActive(40, 6, generator=gen(seed)),
        "mined": lambda: MinedActive(40, 4, candidates=10, generator=gen(seed)),
        "persistent": lambda: PersistentActive(40, 3, 8, tol=0.3, generator=gen(seed)),
        "persistent-mined": lambda: PersistentActive(
            40, 3, 8, tol=0.3, candidates=9, generator=gen(seed), inequality=True
        ),
    }[kind]()


@pytest.mark.parametrize("kind", ["random", "mined", "persistent", "persistent-mined"])
def test_state_dict_round_trip(kind: str) -> None:
    rng = np.random.default_rng(5)
    tables = [rng.normal(size=(40, 6)) * rng.choice([0.1, 1.0], size=(40, 1)) for _ in range(12)]
    a = _make(kind, 0)
    table = Table(tables[0])
    for s in tables[:6]:
        a.select(table.set(s))
    state = copy.deepcopy(a.state_dict())
    rest_a = [a.select(table.set(s)).tolist() for s in tables[6:]]
    b = _make(kind, 123)  # another seed: the generator state comes from the state_dict
    b.load_state_dict(state)
    rest_b = [b.select(table.set(s)).tolist() for s in tables[6:]]
    assert rest_a == rest_b
    assert a.t == b.t == 12
    if isinstance(a, PersistentActive):
        assert torch.equal(a.streaks, b.streaks)
        assert (a.total_added, a.total_evicted) == (b.total_added, b.total_evicted)


# ---- errors ------------------------------------------------------------------------------------


def test_errors() -> None:
    g = gen()
    with pytest.raises(ValueError, match="k must be <= pool_size=5, got 6"):
        RandomActive(5, 6, generator=g)
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        RandomActive(5, 0, generator=g)
    with pytest.raises(ValueError, match="pool_size must be an integer >= 1"):
        RandomActive(2.5, 1, generator=g)
    with pytest.raises(ValueError, match=r"generator must be a torch\.Generator"):
        RandomActive(5, 1, generator=0)
    with pytest.raises(ValueError, match="candidates must be >= k=4, got 3"):
        MinedActive(10, 4, candidates=3, generator=g)
    with pytest.raises(ValueError, match="budget must be >= k_new=3, got 2"):
        PersistentActive(10, 3, 2, tol=0.1, generator=g)
    with pytest.raises(ValueError, match=r"tol must be a finite number >= 0, got -0\.1"):
        PersistentActive(10, 3, 5, tol=-0.1, generator=g)
    with pytest.raises(ValueError, match="tol must be a finite number >= 0, got nan"):
        PersistentActive(10, 3, 5, tol=float("nan"), generator=g)
    with pytest.raises(ValueError, match="k_new must be <= pool_size=10, got 11"):
        PersistentActive(10, 11, 12, tol=0.1, generator=g)
    with pytest.raises(ValueError, match="candidates must be >= k_new=3, got 2"):
        PersistentActive(10, 3, 5, tol=0.1, candidates=2, generator=g)
    with pytest.raises(ValueError, match="inequality must be a bool"):
        RandomActive(5, 1, generator=g, inequality="yes")
    sel = MinedActive(10, 2, candidates=10, generator=g)
    with pytest.raises(
        ValueError, match=r"must return a tensor of shape \(10, N_C\), got \(9, 3\)"
    ):
        sel.select(lambda idx: torch.zeros(9, 3))
    with pytest.raises(ValueError, match="does not match"):
        sel.load_state_dict(MinedActive(10, 3, candidates=10, generator=g).state_dict())
    p = PersistentActive(10, 2, 4, tol=0.1, generator=g)
    bad = p.state_dict()
    bad["streaks"] = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="equal length"):
        p.load_state_dict(bad)

"""Small-cell suppression: naive hiding leaks through totals, complementary suppression does not.

The attacker here knows every true marginal total along every dimension (the strongest position a
published table plus census figures can give) and solves for each hidden cell by linear programming:
a cell leaks when its feasible range collapses to one value.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
from scipy.optimize import linprog

from ehrlake.eda.suppression import COMPLEMENTARY, PRIMARY, suppress


def _constraints(cells: dict[tuple, int], hidden: set[tuple], ndim: int) -> tuple[list[tuple], list, list]:
    """The hidden cells in order, and the attacker's equations over them: one per line along every
    dimension, its hidden cells summing to the true total less the visible ones."""
    order = sorted(hidden)
    index = {c: i for i, c in enumerate(order)}
    rows, rhs = [], []
    for dim in range(ndim):
        lines: dict[tuple, list[tuple]] = {}
        for cell in cells:
            lines.setdefault(cell[:dim] + cell[dim + 1 :], []).append(cell)
        for members in lines.values():
            unknown = [c for c in members if c in hidden]
            if not unknown or len(members) == 1:  # a one-cell "total" is the cell itself, not a margin
                continue
            row = np.zeros(len(order))
            for c in unknown:
                row[index[c]] = 1
            rows.append(row)
            rhs.append(sum(cells[c] for c in members) - sum(cells[c] for c in members if c not in hidden))
    return order, rows, rhs


def _feasible_ranges(
    cells: dict[tuple, int], hidden: set[tuple], ndim: int
) -> dict[tuple, tuple[float, float]]:
    """For each hidden cell, the min and max value consistent with visible cells and all true
    marginal totals (every line along every dimension), counts >= 0."""
    order, rows, rhs = _constraints(cells, hidden, ndim)
    ranges = {}
    for i, cell in enumerate(order):
        objective = np.zeros(len(order))
        objective[i] = 1
        low = linprog(objective, A_eq=np.array(rows), b_eq=rhs, bounds=(0, None)).fun
        high = -linprog(-objective, A_eq=np.array(rows), b_eq=rhs, bounds=(0, None)).fun
        ranges[cell] = (low, high)
    return ranges


def _random_table(
    rng: random.Random, ndims: list[int], longest: int, zeros: float, high: int, hidden: float
) -> tuple[list[int], dict[tuple, int], set[tuple]]:
    """A table of random shape (``ndims`` dimensions of 2 to ``longest`` values): its cells, a
    share ``zeros`` of them 0 and the others 1 to ``high``, and a random share ``hidden`` hidden."""
    shape = [rng.randint(2, longest) for _ in range(rng.choice(ndims))]
    cells = {
        c: (0 if rng.random() < zeros else rng.randint(1, high))
        for c in itertools.product(*[range(s) for s in shape])
    }
    return shape, cells, {c for c in cells if rng.random() < hidden}


def _run(spark, cells: dict[tuple, int], dims: list[str], k: int = 11):
    df = spark.createDataFrame([(*c, n) for c, n in cells.items()], [*dims, "n"])
    out = suppress(df, dims, "n", k).collect()
    return {tuple(r[d] for d in dims): r for r in out}


def test_naive_suppression_leaks_through_a_row_total_and_complementary_suppression_does_not(spark):
    cells = {("A", "F"): 5, ("A", "M"): 40, ("B", "F"): 30, ("B", "M"): 25, ("C", "F"): 12, ("C", "M"): 60}
    naive_hidden = {c for c, n in cells.items() if 1 <= n < 11}
    naive = _feasible_ranges(cells, naive_hidden, 2)
    assert naive[("A", "F")] == (5, 5)  # 45 (row total) - 40: recovered exactly

    result = _run(spark, cells, ["region", "sex"])
    hidden = {c for c, r in result.items() if r.suppressed}
    assert result[("A", "F")].suppressed == PRIMARY and result[("A", "F")].n is None
    assert any(result[c].suppressed == COMPLEMENTARY for c in hidden)
    for cell, (low, high) in _feasible_ranges(cells, hidden, 2).items():
        assert high - low >= 1, f"{cell} is pinned to {low}"
    visible = {c: r.n for c, r in result.items() if not r.suppressed}
    assert all(visible[c] == cells[c] for c in visible)  # visible cells are unchanged


def test_three_dimensional_table_with_many_small_cells_leaks_nothing(spark):
    rng = random.Random(7)
    dims = ["age_band", "sex", "region"]
    cells = {
        c: rng.choice([0, 1, 2, 3, 5, 8, 12, 20, 35, 60, 150])
        for c in itertools.product(["0-17", "18-44", "45-64", "65+"], ["F", "M"], ["KA", "MH", "TN"])
    }
    result = _run(spark, cells, dims)
    hidden = {c for c, r in result.items() if r.suppressed}
    assert {c for c, n in cells.items() if 1 <= n < 11} <= hidden  # every small cell is hidden
    assert all(cells[c] > 0 for c in hidden if result[c].suppressed == PRIMARY)
    for cell, (low, high) in _feasible_ranges(cells, hidden, 3).items():
        assert high - low >= 1, f"{cell} ({cells[cell]}) is pinned"


def test_the_same_cells_in_any_row_order_hide_the_same_cells(spark):
    """An aggregate comes back from a shuffle in no fixed order: re-running a job must publish the
    same pattern (the complements chosen depend on which cell is met first)."""
    rng = random.Random(3)
    dims = ["year", "region", "condition"]
    cells = {
        c: rng.choice([0, 0, 1, 2, 4, 7, 9, 12, 15, 30, 80])
        for c in itertools.product(range(2016, 2022), ["KA", "MH", "TN", "UP", "WB"], "ABCDEFGH")
    }
    rows = [(*c, n) for c, n in cells.items()]
    patterns = set()
    for seed in range(4):
        random.Random(seed).shuffle(rows)
        out = suppress(spark.createDataFrame(rows, [*dims, "n"]).coalesce(1), dims, "n", 11).collect()
        patterns.add(frozenset((r.year, r.region, r.condition, r.suppressed) for r in out))
    assert len(patterns) == 1


def test_derived_columns_are_hidden_with_their_count_and_k_is_configurable(spark):
    df = spark.createDataFrame(
        [("A", "F", 12, 12 / 40), ("A", "M", 28, 28 / 40), ("B", "F", 15, 0.5), ("B", "M", 15, 0.5)],
        "region string, sex string, n long, pct double",
    )
    strict = {(r.region, r.sex): r for r in suppress(df, ["region", "sex"], k=13, derived=["pct"]).collect()}
    assert strict[("A", "F")].n is None and strict[("A", "F")].pct is None
    assert strict[("A", "M")].suppressed == COMPLEMENTARY and strict[("A", "M")].pct is None
    default = suppress(df, ["region", "sex"]).where("suppressed IS NOT NULL").count()
    assert default == 0  # nothing under the default k = 11


def test_an_unprotectable_cell_does_not_blank_the_table():
    """A territory where everyone is female aged 25-44 (5 people): its male cell is 0 and the male
    line of that territory totals 0, so 5 follows from the totals however much is hidden. The search
    must stop rather than hide every cell, and leave the large cells of other states visible."""
    import pandas as pd

    from ehrlake.eda.suppression import suppress_frame

    bands, states = ["0-24", "25-44", "45-64", "65+"], [f"S{i}" for i in range(6)]
    rows = []
    for s, band, sex in itertools.product(states, bands, ["female", "male"]):
        rows.append((band, sex, s, 40 + 7 * len(rows) % 50))
    rows += [
        (band, sex, "Tiny", 5 if (band, sex) == ("25-44", "female") else 0)
        for band in bands
        for sex in ("female", "male")
    ]
    cells = pd.DataFrame(rows, columns=["age_band", "sex", "state", "n"])
    status = suppress_frame(cells, ["age_band", "sex", "state"], "n", 11)
    tiny = (cells.state == "Tiny") & (cells.n == 5)
    assert status[tiny].tolist() == [PRIMARY]
    assert status.isna().sum() >= 20  # much of the table is still published (without the stop: none)


def test_independent_tables_and_a_small_denominator(spark):
    """Indicators over the same persons are separate tables: a small cell of one does not hide the
    other's cells; a small denominator hides its row even where the numerator is large enough."""
    rows = []
    for region in ("a", "b", "c", "d"):
        for sex in ("f", "m"):
            rows.append((region, sex, "obese", 40, 20))
            rows.append((region, sex, "diabetic", 40, 3 if (region, sex) == ("a", "f") else 15))
    rows[-1] = ("d", "m", "diabetic", 8, 12)  # impossible in life, but a small denominator
    df = spark.createDataFrame(rows, "region string, sex string, indicator string, measured int, n int")
    out = suppress(df, ["region", "sex", "indicator"], "n", 11, derived=[], independent=["indicator"],
                   counts=["measured"]).collect()  # fmt: skip
    hidden = {(r.region, r.sex, r.indicator): r for r in out if r.suppressed}
    assert not any(ind == "obese" for _, _, ind in hidden)  # the other indicator keeps every cell
    assert ("a", "f", "diabetic") in hidden and hidden[("a", "f", "diabetic")].n is None
    assert ("d", "m", "diabetic") in hidden and hidden[("d", "m", "diabetic")].measured is None
    for r in out:
        if r.suppressed is None:
            assert r.n >= 11 and r.measured >= 11


def test_the_audits_shortcut_finds_exactly_the_cells_whose_range_is_one_value():
    """``_fixed`` (one LP and a projection per block) must call pinned exactly the hidden cells whose
    min and max, by two LPs each, coincide: zeros that cannot rise, bridges, lone cells in a line."""
    from scipy.sparse import csr_matrix

    from ehrlake.eda.suppression import _fixed

    rng = random.Random(3)
    seen = {True: 0, False: 0}
    for _ in range(40):
        shape, cells, hidden = _random_table(rng, [2, 3], 5, zeros=0.3, high=30, hidden=0.35)
        if not hidden:
            continue
        order, rows, _ = _constraints(cells, hidden, len(shape))
        fixed = _fixed(csr_matrix(np.array(rows)), np.array([float(cells[c]) for c in order]))
        ranges = _feasible_ranges(cells, hidden, len(shape))
        for j, cell in enumerate(order):
            low, high = ranges[cell]
            assert bool(fixed[j]) == (high - low < 1e-9), (shape, cell, ranges[cell])
            seen[bool(fixed[j])] += 1
    assert seen[True] > 20 and seen[False] > 20  # both kinds met, many times


def test_a_box_move_frees_only_cells_whose_range_is_at_least_one():
    """``_BoxMoves`` proves cells not pinned without an LP: each cell it frees must have a range (two
    LPs) of 1 or more, and on tables with many hidden cells it must free most of those that do."""
    import pandas as pd

    from ehrlake.eda.suppression import _BoxMoves

    rng = random.Random(5)
    freed = {True: 0, False: 0}
    for _ in range(40):
        shape, cells, hidden = _random_table(rng, [1, 2, 3], 4, zeros=0.2, high=12, hidden=0.6)
        if not hidden:
            continue
        frame = pd.DataFrame([(*map(str, c), n) for c, n in cells.items()])
        moves = _BoxMoves(frame, list(frame.columns[:-1]))
        order = list(cells)
        is_hidden = np.array([c in hidden for c in order])
        verdicts = moves.freed(np.arange(len(order)), is_hidden, np.array([float(cells[c]) for c in order]))
        ranges = _feasible_ranges(cells, hidden, len(shape))
        for cell, free in zip(order, verdicts, strict=True):
            if free:
                low, high = ranges[cell]
                assert high - low >= 1 - 1e-9, (shape, cell, ranges[cell])
            if cell in hidden and ranges[cell][1] - ranges[cell][0] >= 1 - 1e-9:
                freed[bool(free)] += 1
    assert freed[True] > 3 * freed[False]  # most free cells have a box

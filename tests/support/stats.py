"""Chi-square test of homogeneity for two samples of categorical outcomes (own implementation: the
regularized upper incomplete gamma function by series / continued fraction, as in any numerics text)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def _gammainc_upper(a: float, x: float) -> float:
    """Q(a, x) = Gamma(a, x) / Gamma(a)."""
    if x <= 0:
        return 1.0
    if x < a + 1:  # series for P(a, x)
        term = total = 1.0 / a
        n = a
        for _ in range(1000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return 1.0 - total * math.exp(-x + a * math.log(x) - math.lgamma(a))
    b, c, d = x + 1 - a, 1e300, 1 / (x + 1 - a)  # Lentz's continued fraction for Q(a, x)
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, df: int) -> float:
    return _gammainc_upper(df / 2, x / 2)


Table = dict[str, tuple[int, int]]


def homogeneity(a: Sequence[str], b: Sequence[str], min_expected: float = 5.0) -> tuple[float, int, float, Table]:
    """(statistic, degrees of freedom, p-value, table) for "a and b come from one distribution".

    Categories whose expected count is below `min_expected` in either row are pooled into one "rare"
    category (pooled again with the smallest if still too small)."""
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    cats = sorted(set(ca) | set(cb))

    def expected(cat_a: int, cat_b: int) -> float:
        return min((cat_a + cat_b) * na, (cat_a + cat_b) * nb) / (na + nb)

    table = {c: (ca[c], cb[c]) for c in cats}
    rare = [c for c, (x, y) in table.items() if expected(x, y) < min_expected]
    if rare:
        pooled = (sum(table[c][0] for c in rare), sum(table[c][1] for c in rare))
        for c in rare:
            del table[c]
        if table and expected(*pooled) < min_expected:
            smallest = min(table, key=lambda c: sum(table[c]))
            x, y = table.pop(smallest)
            pooled = (pooled[0] + x, pooled[1] + y)
        table["rare"] = pooled
    if len(table) < 2:
        return 0.0, 0, 1.0, table
    stat = 0.0
    for x, y in table.values():
        col = x + y
        for obs, n in ((x, na), (y, nb)):
            e = col * n / (na + nb)
            stat += (obs - e) ** 2 / e
    df = len(table) - 1
    return stat, df, chi2_sf(stat, df), table

"""A small PromQL scanner for the catalogue tests (test_observability_catalogue.py): the metric
series an expression names, its label matchers, and its grouping clauses with the metrics each
applies to. Enough for the dashboard's and the rules' queries, not a full parser."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(),{}])
    |(?P<space>\s+)""",
    re.X,
)
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
CLAUSES = {"by", "without", "on", "ignoring", "group_left", "group_right"}


Matcher = tuple[str, str, str, str]  # series, label, operator, value


@dataclass
class Query:
    """What one expression names: metric series (with their positions), label matchers, and
    grouping clauses with the metrics they apply to."""

    text: str
    metrics: list[tuple[int, str]] = field(default_factory=list)  # (token index, series)
    matchers: list[Matcher] = field(default_factory=list)
    clauses: list[tuple[str, list[str], set[str]]] = field(default_factory=list)  # scoped


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 20]!r} in {expr!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            out.append((kind, match.group()))
    return out


def _closing(toks: list[tuple[str, str]], start: int) -> int:
    """Index of the bracket that closes toks[start]."""
    opening = toks[start][1]
    closing = {"(": ")", "{": "}"}[opening]
    depth = 0
    for i in range(start, len(toks)):
        if toks[i] == ("op", opening):
            depth += 1
        elif toks[i] == ("op", closing):
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening}")


def _idents(toks: list[tuple[str, str]]) -> list[str]:
    return [text for kind, text in toks if kind == "ident"]


def _metrics_in(query: Query, lo: int, hi: int) -> set[str]:
    return {name for pos, name in query.metrics if lo <= pos <= hi}


def parse(expr: str) -> Query:
    toks = tokens(expr)
    query = Query(expr)
    scoped: list[tuple[str, list[str], tuple[int, int]]] = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if kind != "ident":
            i += 1
            continue
        if text in CLAUSES and nxt == ("op", "("):
            end = _closing(toks, i + 1)
            scoped.append((text, _idents(toks[i + 2 : end]), _scope(toks, i, text)))
            i = end + 1
        elif text in AGGREGATIONS or text.lower() in KEYWORDS or nxt == ("op", "("):
            i += 1  # an aggregation, a keyword or a function: what follows is its argument
        elif nxt == ("op", "{"):
            end = _closing(toks, i + 1)
            query.metrics.append((i, text))
            query.matchers.extend(_matchers(text, toks[i + 2 : end]))
            i = end + 1
        else:
            query.metrics.append((i, text))
            i += 1
    for clause, labels, (lo, hi) in scoped:
        query.clauses.append((clause, labels, _metrics_in(query, lo, hi)))
    return query


def _scope(toks: list[tuple[str, str]], at: int, clause: str) -> tuple[int, int]:
    """The token span a clause applies to: an aggregation's argument for by/without (written
    before or after it), the enclosing parentheses for on/ignoring/group_*."""
    if clause in ("by", "without"):
        if toks[at - 1][1] in AGGREGATIONS:  # sum by (l) (arg)
            start = _closing(toks, at + 1) + 1
            return start, _closing(toks, start)
        depth = 0  # sum (arg) by (l): the argument ends just before the clause
        for j in range(at - 1, -1, -1):
            if toks[j] == ("op", ")"):
                depth += 1
            elif toks[j] == ("op", "("):
                depth -= 1
                if depth == 0:
                    return j, at
        raise ValueError("a by/without clause without its aggregation")
    depth = 0
    for j in range(at - 1, -1, -1):
        if toks[j] == ("op", ")"):
            depth += 1
        elif toks[j] == ("op", "("):
            if depth == 0:
                return j, _closing(toks, j)
            depth -= 1
    return 0, len(toks)


def _matchers(metric: str, inner: list[tuple[str, str]]) -> Iterator[Matcher]:
    for j in range(0, len(inner), 4):
        (_, label), (_, op), (_, value) = inner[j : j + 3]
        yield metric, label, op, value[1:-1]


def grafana_to_promql(expr: str) -> str:
    """A panel's query as Prometheus sees it once Grafana has filled in its variables."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", ".*", expr)


def test_the_scanner_sees_metrics_labels_and_clause_scopes() -> None:
    query = parse(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{x="1", y=~"b|c"}[5m])))'
        " > on (model) group_left max by (model) (b) or sum(rate(c[1m])) without (z)"
    )
    assert [name for _, name in query.metrics] == ["a_bucket", "b", "c"]
    assert query.matchers == [("a_bucket", "x", "=", "1"), ("a_bucket", "y", "=~", "b|c")]
    assert query.clauses == [
        ("by", ["le", "model"], {"a_bucket"}),
        ("on", ["model"], {"a_bucket", "b", "c"}),
        ("by", ["model"], {"b"}),
        ("without", ["z"], {"c"}),
    ]

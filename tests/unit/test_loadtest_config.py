"""Load-test config: stages, distributions, mix, bounds; errors name the field."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.loadtest.config import (
    GRACE_S,
    LoadTestConfig,
    LoadTestConfigError,
    LogNormal,
    Normal,
    RequestKind,
    Uniform,
    build_config,
    load_config,
    parse_lengths,
    parse_mix,
    stages_from,
)

URL = "http://127.0.0.1:8000"


def config(**fields: object) -> LoadTestConfig:
    return build_config({"base_url": URL, "stages": [{"duration_s": 5, "users": 1}], **fields})


def test_defaults_and_derived_values() -> None:
    c = config(stages=[{"duration_s": 10, "users": 2}, {"duration_s": 20, "users": 4}])
    assert c.base_url == f"{URL}/v1"
    assert c.stages_total_s == 30
    assert c.deadline_s == 30 + GRACE_S
    assert c.load_unit == "users"
    assert [s.label for s in c.stages] == ["2 users", "4 users"]
    assert config().stages[0].label == "1 user"


def test_rate_stages_get_users_to_pace_the_rate() -> None:
    c = config(stages=[{"duration_s": 5, "rps": 2.5}, {"duration_s": 5, "rps": 10, "users": 3}])
    assert c.load_unit == "rps"
    assert [s.user_count for s in c.stages] == [10, 3]
    assert [s.offered for s in c.stages] == [2.5, 10.0]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stages": []}, "stages"),
        ({"stages": [{"duration_s": 5}]}, "stages.0: a stage needs `users` or `rps`"),
        ({"stages": [{"duration_s": 0, "users": 1}]}, "stages.0.duration_s"),
        ({"stages": [{"duration_s": 5, "users": 1}, {"duration_s": 5, "rps": 1}]}, "every stage"),
        ({"max_duration_s": 3}, "max_duration_s (3) is shorter than the stages (5 s)"),
        ({"max_duration_s": 10 * 24 * 3600}, "max_duration_s"),
        ({"stages": [{"duration_s": 90000, "users": 1}]}, "24 h cap"),
        ({"mix": {"chat": 0, "stream": 0, "completion": 0, "embedding": 0}}, "mix"),
        ({"thresholds": {"error_rate": 2}}, "thresholds.error_rate"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_configs_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(LoadTestConfigError) as info:
        config(**fields)
    assert message in str(info.value)


def test_api_key_is_never_dumped() -> None:
    c = config(api_key="sk-secret")
    assert c.api_key is not None and c.api_key.get_secret_value() == "sk-secret"
    assert "sk-secret" not in c.model_dump_json()
    assert "api_key" not in c.model_dump(mode="json")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128", {"kind": "fixed", "tokens": 128}),
        ("fixed:16", {"kind": "fixed", "tokens": 16}),
        ("uniform:8:64", {"kind": "uniform", "low": 8, "high": 64}),
        ("normal:100:20", {"kind": "normal", "mean": 100, "stddev": 20}),
        ("lognormal:100:0.5:10:400", {"kind": "lognormal", "median": 100, "low": 10, "high": 400}),
    ],
)
def test_parse_lengths(text: str, expected: dict[str, object]) -> None:
    dumped = parse_lengths(text).model_dump()
    assert {k: dumped[k] for k in expected} == expected


@pytest.mark.parametrize("text", ["", "fixed:0", "uniform:9:3", "poisson:3", "normal:1:2:3:4:5"])
def test_bad_lengths_are_refused(text: str) -> None:
    with pytest.raises(LoadTestConfigError, match="lengths"):
        parse_lengths(text)


def test_distributions_stay_in_bounds() -> None:
    rng = random.Random(1)
    for dist in (
        Uniform(low=5, high=9),
        Normal(mean=7, stddev=50, low=5, high=9),
        LogNormal(median=7, sigma=3, low=5, high=9),
    ):
        samples = {dist.sample(rng) for _ in range(500)}
        assert samples <= set(range(5, 10)) and len(samples) > 1


def test_parse_mix_weighs_left_out_kinds_zero() -> None:
    mix = parse_mix("chat=1, stream=3")
    assert mix.kinds() == [RequestKind.CHAT, RequestKind.STREAM]
    with pytest.raises(LoadTestConfigError, match="KIND=WEIGHT"):
        parse_mix("images=1")
    with pytest.raises(LoadTestConfigError, match="every weight"):
        parse_mix("chat=0")


def test_stages_from_flags() -> None:
    assert stages_from("1,4", None, 10) == [
        {"duration_s": 10, "users": 1},
        {"duration_s": 10, "users": 4},
    ]
    assert stages_from(None, "2.5", 5, spawn_rate=2) == [
        {"duration_s": 5, "rps": 2.5, "spawn_rate": 2}
    ]
    assert stages_from(None, None, 5) == []
    with pytest.raises(LoadTestConfigError, match="not a number"):
        stages_from("1,x", None, 5)
    with pytest.raises(LoadTestConfigError, match="not both"):
        stages_from("1", "2", 5)


def test_yaml_config_with_flags_laid_over_it(tmp_path: Path) -> None:
    path = tmp_path / "load.yaml"
    path.write_text(
        f"base_url: {URL}\n"
        "stages: [{duration_s: 5, users: 1}, {duration_s: 5, users: 8}]\n"
        "thresholds: {p95_ms: 500, error_rate: 0.05}\n"
        "output_tokens: {kind: uniform, low: 4, high: 16}\n"
    )
    c = load_config(path, thresholds={"p95_ms": 800}, seed=None)
    assert c.thresholds.p95_ms == 800 and c.thresholds.error_rate == 0.05
    assert isinstance(c.output_tokens, Uniform)
    assert len(c.stages) == 2


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "load.yaml"
    path.write_text("- just a list\n")
    with pytest.raises(LoadTestConfigError, match=r"load\.yaml"):
        load_config(path)

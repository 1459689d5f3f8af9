"""Config validation, consistency-level parsing and replica placement."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.kv import protocol
from app.kv.config import KVConfig, ReadConcern, WriteConcern, read_code, write_code
from app.kv.errors import UnknownConsistencyError
from app.kv.placement import effective_replication, place_group, place_member


def test_defaults_are_majority_writes_and_strong_reads() -> None:
    cfg = KVConfig()
    assert cfg.write_concern == WriteConcern.MAJORITY and cfg.read_concern == ReadConcern.STRONG
    assert cfg.replication_factor == 3 and not cfg.durable


def test_invalid_config_names_the_field() -> None:
    with pytest.raises(ValidationError, match="data_dir"):
        KVConfig(durable=True)
    with pytest.raises(ValidationError, match="replication_factor"):
        KVConfig(replication_factor=0)
    with pytest.raises(ValidationError, match="write_concern"):
        KVConfig(write_concern="quorum")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="unknown_field"):
        KVConfig(unknown_field=1)  # type: ignore[call-arg]


def test_consistency_levels_parse_from_enum_or_string() -> None:
    assert write_code("one") == write_code(WriteConcern.ONE) == protocol.WRITE_ONE
    assert write_code("all") == protocol.WRITE_ALL
    assert read_code("eventual") == read_code(ReadConcern.EVENTUAL) == protocol.READ_EVENTUAL
    assert read_code("bounded") == protocol.READ_BOUNDED
    for bad in ("linearizable", "STRONG", 1, None, ["strong"]):
        with pytest.raises(UnknownConsistencyError):
            read_code(bad)
        with pytest.raises(UnknownConsistencyError):
            write_code(bad)


def test_replication_is_capped_by_nodes_unless_colocation_is_allowed() -> None:
    assert effective_replication(3, 1, allow_colocated=False) == 1
    assert effective_replication(3, 2, allow_colocated=False) == 2
    assert effective_replication(3, 5, allow_colocated=False) == 3
    assert effective_replication(3, 1, allow_colocated=True) == 3


def test_groups_spread_members_and_rotate_primaries() -> None:
    nodes = ["a", "b", "c"]
    assert place_group(nodes, 3, 0) == ["a", "b", "c"]
    assert place_group(nodes, 3, 1) == ["b", "c", "a"]
    assert place_group(["a", "b"], 2, 1)[0] == "b"
    assert place_group(["a"], 2, 0) == ["a", "a"]
    with pytest.raises(ValueError):
        place_group([], 1, 0)


def test_replacement_prefers_an_unused_then_least_loaded_node() -> None:
    assert place_member(["a", "b", "c"], ["a"], ["a", "b", "b"], False) == "c"
    assert place_member(["a", "b"], ["a", "b"], ["a", "b"], False) is None
    assert place_member(["a"], ["a"], ["a", "a"], True) == "a"
    assert place_member([], [], [], True) is None

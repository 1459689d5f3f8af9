"""The catalogue's loader table: it agrees with the runners and keeps catalog free of serving."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import app.catalog.loaders as loaders
from app.catalog.cards import ModelCard
from app.catalog.cards import Task as CardsTask
from app.catalog.loaders import (
    BUILTIN_LOADERS,
    UnknownLoaderError,
    known_loaders,
    loader_task,
    register_loader,
)
from app.catalog.tasks import Task
from app.serving.runners import LoadedInfo, Runner
from app.serving.runners.base import UnknownLoaderError as RunnersUnknownLoaderError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def restore_table() -> Iterator[None]:
    saved = dict(loaders._loaders)
    yield
    loaders._loaders.clear()
    loaders._loaders.update(saved)


def test_every_registered_runner_agrees_with_the_table() -> None:
    runners = Runner.registered()
    assert runners, "importing app.serving.runners registers the built-in runners"
    for name, runner in runners.items():
        assert loader_task(name) is runner.task, name
        assert known_loaders()[name] is runner.task, name


def test_builtin_table_lists_exactly_the_builtin_runners() -> None:
    builtin = {
        name: runner.task
        for name, runner in Runner.registered().items()
        if runner.__module__.startswith("app.serving.runners.")
    }
    assert builtin == dict(BUILTIN_LOADERS)


def test_unknown_loader_names_the_known_ones() -> None:
    with pytest.raises(UnknownLoaderError, match=r"known loaders: .*'echo'") as info:
        loader_task("nope")
    assert isinstance(info.value, ValueError)
    assert UnknownLoaderError is RunnersUnknownLoaderError
    assert CardsTask is Task


def test_register_loader_is_idempotent_and_refuses_a_new_task(restore_table: None) -> None:
    register_loader("echo", Task.TEXT_GENERATION)
    with pytest.raises(ValueError, match="text-generation"):
        register_loader("echo", Task.EMBEDDING)
    register_loader("custom", Task.EMBEDDING)
    assert loader_task("custom") is Task.EMBEDDING
    ModelCard(id="m", task="embedding", loader="custom")


def test_runner_subclass_registers_its_loader(restore_table: None) -> None:
    class _Custom(Runner, loader="test-custom-embedding"):
        task = Task.EMBEDDING

        def load(self) -> LoadedInfo:
            raise NotImplementedError

    try:
        assert loader_task("test-custom-embedding") is Task.EMBEDDING
    finally:
        Runner._registry.pop("test-custom-embedding", None)


def test_catalog_cards_does_not_import_serving() -> None:
    script = (
        "import sys\n"
        "from app.catalog.cards import ModelCard, load_catalogue\n"
        "load_catalogue('models')\n"
        "ModelCard(id='m', task='text-to-image', loader='diffusers-stable-diffusion')\n"
        "leaked = sorted(m for m in sys.modules if m == 'app.serving' or m.startswith('app.serving.'))\n"
        "assert not leaked, leaked\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

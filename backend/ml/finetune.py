"""Fine-tuning the encoder on a project's labelled texts, for when a linear head on frozen embeddings saturates.

Linear probe, then fine-tune (LP-FT, Kumar et al. 2022): the head already fit on frozen embeddings starts the
joint training, so the first steps do not distort the encoder's features with gradients from a random head.
Encoder and head are trained together on cross-entropy (softmax) or binary cross-entropy (sigmoid) with AdamW
and a linear decay, on the encoder's device (fp32 weights, under bf16/fp16 autocast on CUDA, the same code on
CPU, whatever precision the frozen encoder runs in). The original
encoder is left untouched: the result is a copy with its own `encoder_id`, so its embeddings never mix with the
frozen encoder's in a cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

from backend.ml.encoder import Encoder, mixed_precision_dtype
from backend.ml.head import LinearHead
from backend.ml.model_files import POOLING_CONFIG, POOLING_KEYS, REVISION_FILE, SENTENCE_CONFIG


@dataclass(frozen=True)
class FineTuneConfig:
    """How the encoder is fine-tuned. Defaults are the usual ones for small BERT-style encoders."""

    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 3e-5
    """For the encoder's weights."""
    head_learning_rate: float = 1e-3
    """For the head, which starts from the linear probe."""
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("learning_rate", "head_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def finetune_encoder(
    encoder: Encoder,
    texts: list[str],
    targets: np.ndarray,
    probe: LinearHead,
    config: FineTuneConfig = FineTuneConfig(),
) -> tuple[Encoder, LinearHead]:
    """Fine-tune a copy of `encoder` together with a head that starts as `probe`.

    Args:
        encoder: the frozen encoder (not modified).
        texts: n labelled texts.
        targets: (n, k) 0/1 labels, one 1 per row for single choice.
        probe: a head fit on `encoder`'s embeddings of `texts` (the linear probe); its `multi_label` picks the loss.

    Returns:
        The fine-tuned encoder (a copy, with an `encoder_id` of its own) and the head trained with it.
    """
    targets = np.asarray(targets, dtype=np.float32)
    if len(texts) != len(targets) or not len(texts):
        raise ValueError(f"need matching, non-empty texts and targets, got {len(texts)} and {len(targets)}")
    torch.manual_seed(config.seed)
    tuned = copy.copy(encoder)  # shares the tokenizer; gets its own model below
    tuned.model = _fp32_copy(encoder).train()
    tuned.autocast_dtype = mixed_precision_dtype(encoder.device)
    device = tuned.device
    weights = torch.nn.Parameter(torch.as_tensor(probe.weights, device=device).clone())
    bias = torch.nn.Parameter(torch.as_tensor(probe.bias, device=device).clone())
    optimizer = torch.optim.AdamW(
        [
            {"params": tuned.model.parameters(), "lr": config.learning_rate},
            {"params": [weights, bias], "lr": config.head_learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    steps = config.epochs * math.ceil(len(texts) / config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    token_ids = tuned.token_ids(texts)
    y = torch.as_tensor(targets, device=device)
    rng = np.random.default_rng(config.seed)
    # fp16 autocast (CUDA without bf16) needs loss scaling, or small gradients underflow to zero
    scaler = torch.amp.GradScaler(device.type, enabled=tuned.autocast_dtype == torch.float16)
    for _ in range(config.epochs):
        for rows in np.array_split(rng.permutation(len(texts)), math.ceil(len(texts) / config.batch_size)):
            inputs = tuned.to_device(tuned.pad([token_ids[i] for i in rows]))
            logits = tuned.embed(inputs) @ weights + bias
            loss = _loss(logits, y[torch.as_tensor(rows, device=device)], probe.multi_label)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(tuned.model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    tuned.model.eval()
    tuned.revision = f"finetuned-{_fingerprint(encoder.encoder_id, texts, targets, config)}"
    head = LinearHead(weights.detach().cpu().numpy(), bias.detach().cpu().numpy(), probe.multi_label)
    return tuned, head


def _fp32_copy(encoder: Encoder) -> torch.nn.Module:
    """The encoder's model in fp32 weights, to train and then run: bf16 weights would round small updates away.

    An encoder running in bf16 or fp16 (ENCODER_DTYPE) reloads its weights from its folder or the hub's cache, so
    training starts from the exact ones, not from their rounding."""
    if encoder.weights_dtype == torch.float32:
        return copy.deepcopy(encoder.model)
    return AutoModel.from_pretrained(encoder.path).to(encoder.device, torch.float32)


def _loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    return torch.nn.functional.cross_entropy(logits, targets.argmax(dim=1))


def _fingerprint(base_id: str, texts: list[str], targets: np.ndarray, config: FineTuneConfig) -> str:
    """Identifies a fine-tuning run: same starting encoder, texts, labels and settings, same id."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(base_id.encode("utf-8", errors="replace") + b"\0")
    digest.update("\0".join(texts).encode("utf-8", errors="replace"))
    digest.update(np.ascontiguousarray(targets).tobytes())
    digest.update(repr(config).encode())
    return digest.hexdigest()


def save_encoder(encoder: Encoder, folder: str) -> None:
    """Write `encoder` as a model folder that `Encoder(folder)` (MODEL_NAME=folder) loads with the same pooling and,
    under MAX_LENGTH auto, the same max length (its `max_seq_length`).

    The folder may be one that servers and workers load from (tuned again into the same folder): the files are
    written aside, the old revision file is removed, each file is renamed into place, and the new revision file
    comes last. A process loading meanwhile sees the folder's revision (or, without the file, its fingerprint)
    change and loads it again, so it never caches one model's embeddings under the other's revision.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))  # in the folder: renames stay on one disk
    try:
        encoder.model.save_pretrained(staging)
        encoder.tokenizer.save_pretrained(staging)
        _write_pooling_config(encoder, staging / POOLING_CONFIG)
        (staging / SENTENCE_CONFIG).write_text(json.dumps({"max_seq_length": encoder.max_length}))  # tuned at it
        (target / REVISION_FILE).unlink(missing_ok=True)
        for file in sorted(path for path in staging.rglob("*") if path.is_file()):
            destination = target / file.relative_to(staging)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, destination)
        (staging / REVISION_FILE).write_text(encoder.revision + "\n")
        os.replace(staging / REVISION_FILE, target / REVISION_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_pooling_config(encoder: Encoder, path: Path) -> None:
    """The sentence-transformers pooling config that tells `Encoder` how `encoder` pools token vectors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {"word_embedding_dimension": encoder.dim}
            | {key: encoder.pooling == mode for mode, key in POOLING_KEYS.items()}
        )
    )

"""The sentence encoder: a Hugging Face transformer turned into L2-normalised sentence embeddings.

Texts are tokenised once, sorted by length and cut into batches by a padded-token budget, so short
texts are not padded to the length of long ones. On CUDA the forward pass runs under bf16/fp16
autocast with pinned-memory, non-blocking transfers, and results stay on the GPU until the end: this code reads
nothing back per batch. (transformers may: BERT's SDPA attention checks whether a batch's mask has any padding,
`torch.all(mask == 1)` in transformers 4.57, a one-value read after the batch before it; a 3-D mask would skip
that check for BERT but not every architecture takes one, and `MODEL_NAME` may be any.) On a CPU with native bf16
the weights are bf16 (see `precision`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from backend.config import DEFAULT_MODEL_NAME
from backend.errors import ModelUnavailable
from backend.ml.model_files import (
    max_length_asked,
    model_revision,
    pooling_mode,
    resolve_model_path,
)

log = logging.getLogger(__name__)

AUTO_BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}
"""Padded tokens per batch when BATCH_TOKENS=0: small batches waste less padding on CPU; GPUs want big ones."""
CHARS_PER_TOKEN_BOUND = 100
"""Characters kept per token of `max_length` before tokenising: WordPiece gives up on a word longer than 100
characters ([UNK]) and prose averages 4-6 characters a token, so the cut rarely reaches the tokens that are kept
(it is made at a white space, and a text cut too short is read whole: see `Encoder.token_ids`)."""
LAST_WORD = re.compile(r"\s\S*\Z")
"""The last white space of a text and the (maybe cut) word after it."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""ENCODER_DTYPE's values besides `auto`: the dtype the encoder's weights are cast to."""


def cut_at_white_space(text: str, longest: int) -> str:
    """`text` when it has at most `longest` characters, else its start up to the last white space there (all of
    the `longest` when there is none: one word that long is [UNK] whole or cut)."""
    if len(text) <= longest:
        return text
    piece = text[:longest]
    last_word = LAST_WORD.search(piece)
    return piece[: last_word.start()] if last_word else piece


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable(f"DEVICE={requested!r} but CUDA is not available on this machine")
    return device


LOAD_ATTEMPTS = 3


def _load_unchanging(path: str) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, str, str]:
    """Tokenizer, model, pooling and revision of `path`, all from the same files: when the folder's revision
    changes while it loads (`backend.finetune` writing into it), it is loaded again, so that embeddings of one
    model are never cached under another's revision."""
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():  # else transformers guesses a tokenizer
        raise OSError(f"{path} holds no config.json: not a Hugging Face model folder")
    for _ in range(LOAD_ATTEMPTS):
        revision = model_revision(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
        if getattr(model.config, "is_encoder_decoder", False):  # its forward pass wants decoder inputs too
            raise ModelUnavailable(
                f"{path} is an encoder-decoder model ({model.config.model_type}); use an encoder (BERT-like) or a "
                "sentence-transformers model"
            )
        pooling = pooling_mode(path)
        if model_revision(path) == revision:
            return tokenizer, model, pooling, revision or hub_commit(model)
        log.warning("model folder %s changed while it loaded (fine-tuned into meanwhile?); loading it again", path)
    raise OSError(f"the model folder changed during each of {LOAD_ATTEMPTS} attempts to load it")


def hub_commit(model: PreTrainedModel) -> str:
    """The hub commit a model named by its hub id was loaded at, as `commit-<12 hex digits>`; "" for a local folder.

    A model updated on the hub is another embedding space: its texts are encoded again, not mixed with the old
    commit's vectors under one name.
    """
    commit = getattr(model.config, "_commit_hash", None)
    return f"commit-{commit[:12]}" if commit else ""


@contextlib.contextmanager
def torch_on_one_thread() -> Iterator[None]:
    """Run torch's CPU ops on the calling thread only, inside the block.

    rq's worker loads the encoder and then forks a work-horse per job. Once a process has run an op on torch's
    OpenMP thread pool, a forked child's first parallel op waits forever; loading weights runs none, but casting
    them to bf16 does, so the cast runs here.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower
    than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU feature probes
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for fp32 weights on `device`: bf16 on CUDA devices with bf16 tensor cores (compute
    capability 8, Ampere, and later), else fp16 (a T4 or V100 runs bf16 emulated, fp16 on its tensor cores); None on
    CPU. (`torch.cuda.is_bf16_supported()` counts emulation, and asks about the current device, not `device`.)"""
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def precision(requested: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights dtype, autocast dtype) for ENCODER_DTYPE=`requested` on `device`.

    `auto`: on CUDA, fp32 weights under bf16/fp16 autocast (mixed precision); on a CPU with native bf16, bf16
    weights (AG News: 1.7x the texts/s of fp32 on this project's 2-core machine, embeddings within cosine 0.9998 of
    fp32's, the same head accuracy to 0.0004); on other CPUs, fp32. A named dtype casts the weights, no autocast.
    """
    if requested == "auto":
        if device.type == "cuda":
            return torch.float32, mixed_precision_dtype(device)
        return (torch.bfloat16 if cpu_has_native_bf16() else torch.float32), None
    if requested not in DTYPES:
        raise ValueError(f"ENCODER_DTYPE must be auto or one of {', '.join(DTYPES)}, got {requested!r}")
    return DTYPES[requested], None


@dataclass
class EncodeStats:
    """Figures from the last `encode` call, for benchmarks and logs."""

    texts: int = 0
    batches: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    """The whole call: tokenising, forward passes, the copy back."""
    tokenize_seconds: float = 0.0
    """The part of `seconds` spent in the tokenizer."""


class Encoder:
    """Encodes texts into (n, d) float32 L2-normalised embeddings. Load once per process."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL_NAME,
        device: str = "auto",
        max_length: int = 0,
        batch_tokens: int = 0,
        dtype: str = "auto",
    ):
        self.model_name = model_name
        self.max_length = max_length
        self.device = pick_device(device)
        self.batch_tokens = batch_tokens or AUTO_BATCH_TOKENS[self.device.type]
        weights_dtype, self.autocast_dtype = precision(dtype, self.device)
        self.path = path = resolve_model_path(model_name)
        try:
            self.tokenizer, model, self.pooling, self.revision = _load_unchanging(path)
            with torch_on_one_thread():
                self.model = model.to(self.device, weights_dtype).eval()
        except (OSError, ValueError, ImportError) as exc:  # ImportError: a tokenizer needing e.g. sentencepiece
            raise ModelUnavailable(f"cannot load encoder MODEL_NAME={model_name!r} from {path!r}: {exc}") from exc
        self.max_length = self._usable_max_length(max_length) if max_length else self._own_max_length()
        # the first call sets the fast tokenizer's truncation and padding to ours (a model's tokenizer.json may
        # bring others): done here, not by the first requests, which gunicorn's threads could make at once
        # against the one shared tokenizer (the Rust side refuses: "Already borrowed")
        self._tokenize(["warm-up"])
        self.dim = int(self.model.config.hidden_size)
        self.last_stats = EncodeStats()
        log.info(
            "encoder %s loaded on %s (%s pooling, dim %d, max_length %d, weights %s, autocast %s)",
            model_name,
            self.device,
            self.pooling,
            self.dim,
            self.max_length,
            self.weights_dtype,
            self.autocast_dtype,
        )

    @property
    def weights_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _own_max_length(self) -> int:
        """For MAX_LENGTH auto (0): the tokens per text the model was trained with (a sentence-transformers model's
        `max_seq_length`: 256 for MiniLM, 384 for all-mpnet-base-v2, 128 for the paraphrase models), else
        `DEFAULT_MAX_LENGTH`; at most the model's positions."""
        own = max_length_asked(self.path, 0)
        return min(own, self._position_limit() or own)

    def _usable_max_length(self, requested: int) -> int:
        """`requested`, or less when the model has fewer positions (longer inputs would fail in the forward pass)."""
        usable = min(requested, self._position_limit() or requested)
        if usable < requested:
            log.warning("MAX_LENGTH=%d is more than %s takes; using %d", requested, self.model_name, usable)
        return usable

    def _position_limit(self) -> int | None:
        """The most tokens per text the model takes (its positions, its tokenizer's limit), or None if it says none."""
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions and (padding := self._padding_position()) is not None:
            positions -= padding + 1
        limits = [limit for limit in (positions, self.tokenizer.model_max_length) if isinstance(limit, int)]
        return min((limit for limit in limits if 0 < limit < 10**6), default=None)

    def _padding_position(self) -> int | None:
        """The padding id, for a model whose position ids start after it (RoBERTa and its kind: XLM-R, MPNet, ...,
        told by their position embeddings' `padding_idx`), whose first positions are then not usable; else None."""
        embeddings = getattr(self.model, "embeddings", None)
        padding = getattr(embeddings, "padding_idx", None)
        if padding is None:
            padding = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
        return padding

    @property
    def encoder_id(self) -> str:
        """Identifies the embedding space: cached vectors are only reused under the same id.

        A fine-tuned folder carries its weights' revision, so tuning again into the same folder is a new space; a
        hub model carries its commit, so an update on the hub is one too.
        The precision is not part of it: bf16 and fp32 embeddings of a text agree to a cosine of 0.9998, so workers
        on a GPU, on a CPU with bf16 and on one without share one cache.
        """
        name = f"{self.model_name}@{self.revision}" if self.revision else self.model_name
        return f"{name}|{self.pooling}|{self.max_length}"

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed `texts`: list of n strings -> (n, d) float32, rows L2-normalised, in input order."""
        started = time.perf_counter()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        token_ids = self.token_ids(texts)
        stats = EncodeStats(texts=len(texts), tokenize_seconds=time.perf_counter() - started)
        batches = list(self.batches(token_ids))
        outputs = []
        with torch.inference_mode():
            for batch in batches:
                outputs.append(self._encode_batch([token_ids[i] for i in batch], stats))
        embeddings = torch.cat(outputs).float().cpu().numpy()  # this code's one device->host copy
        result = np.empty_like(embeddings)
        result[np.concatenate(batches)] = embeddings
        stats.seconds = time.perf_counter() - started
        self.last_stats = stats
        return result

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with special tokens, cut at `max_length`.

        The tokenizer reads a whole text before it truncates (a 5 MB document: ~4 s), so a text is first cut at
        `CHARS_PER_TOKEN_BOUND` characters per token it may keep, at a white space (a word cut in two would make
        other tokens): the ids are the same, in a fraction of the time. (Not for a tokenizer that keeps the end.)
        """
        if not texts:  # the tokenizer fails on an empty batch
            return []
        longest = self.max_length * CHARS_PER_TOKEN_BOUND
        if getattr(self.tokenizer, "truncation_side", "right") == "left":
            longest = max(map(len, texts), default=0)
        ids = self._tokenize([cut_at_white_space(text, longest) for text in texts])
        # a cut text that still fills fewer than max_length tokens was mostly characters that make none (runs of
        # spaces, zero-width or stripped accents) or long words that make one ([UNK]): what follows the cut
        # counts, so it is read whole
        whole = [i for i, text in enumerate(texts) if len(text) > longest and len(ids[i]) < self.max_length]
        for i, text_ids in zip(whole, self._tokenize([texts[i] for i in whole]) if whole else [], strict=True):
            ids[i] = text_ids
        return ids

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)["input_ids"]

    def batches(self, token_ids: list[list[int]]) -> Iterator[list[int]]:
        """Yield index lists, longest texts first, whose padded size (rows x longest row) stays within
        `batch_tokens`; the first row of each sets its padded length."""
        order = np.argsort([-len(ids) for ids in token_ids], kind="stable")
        batch: list[int] = []
        for index in order:
            longest = len(token_ids[batch[0]]) if batch else len(token_ids[index])
            if batch and (len(batch) + 1) * longest > self.batch_tokens:
                yield batch
                batch = []
            batch.append(int(index))
        if batch:
            yield batch

    def _encode_batch(self, batch_ids: list[list[int]], stats: EncodeStats) -> torch.Tensor:
        inputs = self.to_device(self.pad(batch_ids))
        stats.batches += 1
        stats.tokens += sum(len(ids) for ids in batch_ids)
        stats.padded_tokens += int(inputs["input_ids"].numel())
        return self.embed(inputs)

    def to_device(self, padded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a padded batch to the encoder's device (pinned memory and a non-blocking copy on CUDA)."""
        on_gpu = self.device.type == "cuda"
        return {
            name: (tensor.pin_memory() if on_gpu else tensor).to(self.device, non_blocking=on_gpu)
            for name, tensor in padded.items()
        }

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward pass and pooling of a padded batch on the device -> (b, d) float32, rows L2-normalised.

        Gradients flow when the caller allows them (fine-tuning); `encode` calls it under inference mode.
        """
        with torch.autocast(
            device_type=self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            hidden = self.model(**inputs).last_hidden_state.float()  # pooled in fp32 whatever the weights
        return torch.nn.functional.normalize(self.pool(hidden, inputs["attention_mask"]), dim=1)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(b, t, d) token vectors of right-padded rows -> (b, d), as the model's pooling config says."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "lasttoken":
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(dim=1) * mask.amax(dim=1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def pad(self, batch_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad token id lists to the batch's longest row (dynamic padding).

        One numpy scatter for the whole batch, not one tensor per row: on a GPU the forward pass of a 65,536-token
        MiniLM batch takes a few milliseconds, and padding row by row in Python took 15 ms.
        """
        lengths = np.fromiter(map(len, batch_ids), dtype=np.int64, count=len(batch_ids))
        mask = np.arange(max(1, lengths.max())) < lengths[:, None]  # one column even if every text has no token
        input_ids = np.full(mask.shape, self.tokenizer.pad_token_id or 0, dtype=np.int64)
        tokens = itertools.chain.from_iterable(batch_ids)
        input_ids[mask] = np.fromiter(tokens, dtype=np.int64, count=int(lengths.sum()))  # row by row, in order
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}


_ENCODERS: dict[tuple, Encoder] = {}


def get_encoder(
    model_name: str, device: str = "auto", max_length: int = 0, batch_tokens: int = 0, dtype: str = "auto"
) -> Encoder:
    """The process-wide encoder for these settings, loaded on first use."""
    key = (model_name, device, max_length, batch_tokens, dtype, os.getpid())
    if key not in _ENCODERS:
        _ENCODERS[key] = Encoder(model_name, device, max_length, batch_tokens, dtype)
    return _ENCODERS[key]

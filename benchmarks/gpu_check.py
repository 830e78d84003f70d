"""Is the encoder's GPU path right? Embeddings on CUDA (ENCODER_DTYPE=auto, as the backend runs them: fp32 weights
under bf16/fp16 autocast; and bf16: the weights cast) against the same model in fp32 on the CPU.

    python -m benchmarks.gpu_check --model DIR [--csv CSV] [--texts 512]

Prints, per GPU variant, the smallest and the median cosine between a text's GPU and CPU embedding, and the
relative error ‖gpu − cpu‖ / ‖cpu‖ over all rows. Rows come back in input order only if the length-sorted
batches are put back right, so a mix-up shows as a small minimum cosine. Exits 1 when a variant's minimum
cosine is under 0.99 or any value is not finite.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np

from backend.bench import DEFAULT_TEXTS


def compare(gpu: np.ndarray, cpu: np.ndarray) -> dict[str, float]:
    """Cosines per row (rows are L2-normalised) and the relative error of the whole matrix."""
    cosines = np.sum(gpu * cpu, axis=1)
    return {
        "min_cosine": float(cosines.min()),
        "median_cosine": float(np.median(cosines)),
        "relative_error": float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)),
        "finite": bool(np.isfinite(gpu).all()),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from backend.ml.encoder import Encoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--csv", default=str(DEFAULT_TEXTS))
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (cpu: checks this script)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    with open(args.csv, newline="", encoding="utf-8") as handle:
        texts = [row["text"] for row in csv.DictReader(handle)][: args.texts]
    reference = Encoder(args.model, device="cpu", dtype="fp32").encode(texts)
    ok = True
    for variant in ("auto", "bf16"):  # several batches each, so that the order is tested
        encoder = Encoder(args.model, device=args.device, batch_tokens=4096, dtype=variant)
        figures = compare(encoder.encode(texts), reference)
        shown = " ".join(
            f"{name}={value:.5f}" if isinstance(value, float) else f"{name}={value}" for name, value in figures.items()
        )
        dtypes = f"weights={encoder.weights_dtype} autocast={encoder.autocast_dtype}"
        print(f"{variant}: {dtypes} batches={encoder.last_stats.batches} {shown}")
        ok &= figures["finite"] and figures["min_cosine"] >= 0.99
    print("gpu_check=" + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

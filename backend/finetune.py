"""`python -m backend.finetune --project ID --out DIR`: fine-tune the encoder on a project's annotations.

For when the linear head on frozen embeddings has saturated (README: Evaluation). The annotations are read from
Label Studio (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY); the encoder is MODEL_NAME, fine-tuned together with a
linear head fit on it first (backend.ml.finetune). DIR becomes a Hugging Face model folder: set MODEL_NAME=DIR
for the server and the workers and restart them. Cached embeddings are keyed by encoder, so the next round
re-encodes the project's pool once (in chunk jobs shared by the workers) and every later round reuses it.
MODEL_NAME applies to every project the backend serves: fine-tune on the project that matters.
"""

from __future__ import annotations

import argparse
import logging
import time

from backend.config import Settings
from backend.label_config import ClassificationConfig, parse_label_config
from backend.logs import configure_logging
from backend.ml.encoder import Encoder
from backend.ml.finetune import FineTuneConfig, finetune_encoder, save_encoder
from backend.ml.head import fit_head, one_hot
from backend.services.train import labelled_tasks

log = logging.getLogger(__name__)


def finetune_on_tasks(
    tasks: list[dict], config: ClassificationConfig, encoder: Encoder, out: str, finetune: FineTuneConfig
) -> dict:
    """Fine-tune `encoder` on the annotated tasks (Label Studio's task JSON) and save it to `out`. -> a summary"""
    examples = labelled_tasks(tasks, config)
    if len(examples) < 2:
        raise SystemExit(f"need at least 2 annotated tasks to fine-tune on, found {len(examples)}")
    started = time.perf_counter()
    texts = [example.text for example in examples]
    targets = one_hot([list(example.choices) for example in examples], config.labels)
    probe = fit_head(encoder.encode(texts), targets, config.multi_label)
    tuned, _ = finetune_encoder(encoder, texts, targets, probe, finetune)
    save_encoder(tuned, out)
    seconds = round(time.perf_counter() - started, 1)
    log.info("fine-tuned %s on %d annotations in %.1f s, saved to %s", encoder.model_name, len(texts), seconds, out)
    return {"annotations": len(examples), "seconds": seconds, "out": out}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--out", required=True, help="folder for the fine-tuned model (then MODEL_NAME=this folder)")
    parser.add_argument("--epochs", type=int, default=FineTuneConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=FineTuneConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=FineTuneConfig.learning_rate)
    args = parser.parse_args(argv)
    try:  # before Label Studio is read and the encoder loaded
        finetune = FineTuneConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate)
    except ValueError as error:
        parser.error(str(error))
    settings = Settings.from_env_or_exit()
    configure_logging(settings)
    from backend.adapters.label_studio import LabelStudio

    if not (settings.label_studio_url and settings.label_studio_api_key):
        parser.error("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY: the annotations are read from Label Studio")
    label_studio = LabelStudio(settings.label_studio_url, settings.label_studio_api_key)
    config = parse_label_config(label_studio.get_project(args.project)["label_config"])
    encoder = Encoder(settings.model_name, settings.device, settings.max_length, dtype=settings.encoder_dtype)
    summary = finetune_on_tasks(label_studio.annotated_tasks(args.project), config, encoder, args.out, finetune)
    print(f"fine-tuned on {summary['annotations']} annotations in {summary['seconds']} s")
    print(f"now set MODEL_NAME={args.out} for the server and the workers, and restart them")


if __name__ == "__main__":
    main()

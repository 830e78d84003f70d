"""The real default encoder (bundled MiniLM, offline) on AG News, through the production services."""

import numpy as np
import pytest
import redis

from backend.adapters.embedding_cache import RedisEmbeddingCache
from backend.label_config import parse_label_config
from backend.ml.artifacts import ArtifactStore
from backend.ml.encoder import get_encoder
from backend.services.predict import Predictor
from backend.services.train import train_project
from tests.conftest import AG_NEWS_CONFIG, read_csv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoder():
    return get_encoder("sentence-transformers/all-MiniLM-L6-v2")


def accuracy(predictor, project, config, rows) -> float:
    tasks = [{"id": i, "data": {"text": row["text"]}} for i, row in enumerate(rows)]
    results = predictor.predict(project, config, tasks)
    assert all(0.0 <= result["score"] <= 1.0 for result in results)
    predicted = [result["result"][0]["value"]["choices"][0] for result in results]
    return float(np.mean([p == row["label"] for p, row in zip(predicted, rows, strict=True)]))


def test_zero_shot_then_200_annotations(encoder, redis_url, tmp_path):
    config = parse_label_config(AG_NEWS_CONFIG)
    cache = RedisEmbeddingCache(redis.Redis.from_url(redis_url), encoder.encoder_id, encoder.dim)
    store = ArtifactStore(tmp_path)
    predictor = Predictor(encoder, store, cache)

    zero_shot = accuracy(predictor, "1", config, read_csv("ag_news/test.csv", 40))
    print(f"zero-shot accuracy on 40 AG News test texts: {zero_shot:.3f}")
    assert zero_shot >= 0.5  # random is 0.25

    pool = read_csv("ag_news/pool.csv")
    picks = np.random.default_rng(0).choice(len(pool), 200, replace=False)
    tasks = [
        {
            "id": int(i),
            "data": {"text": pool[i]["text"]},
            "annotations": [{"id": int(i), "result": config.result([pool[i]["label"]]), "was_cancelled": False}],
        }
        for i in picks
    ]
    artifact = train_project("1", tasks, config, encoder, cache, store)
    assert artifact.meta["annotations"] == 200 and len(artifact.committee) == 5

    trained = accuracy(predictor, "1", config, read_csv("ag_news/test.csv"))
    print(f"accuracy on the 7,600 AG News test texts after 200 annotations: {trained:.4f}")
    assert trained >= 0.80

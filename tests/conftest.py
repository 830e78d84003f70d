"""Shared fixtures: a real redis-server on a free port, a tiny random BERT built offline, app and client."""

from __future__ import annotations

import csv
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.helpers import free_port

pytest_plugins = ["tests.e2e.fixtures"]  # the e2e tests' backend/project fixtures (conftest.py there has label_studio)

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
AG_NEWS_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="topic" toName="text" choice="single">
    <Choice value="World"/><Choice value="Sports"/><Choice value="Business"/><Choice value="Sci/Tech"/>
  </Choices>
</View>"""


ROUTES = [("get", "/health"), ("get", "/metrics"), ("post", "/setup"), ("post", "/predict"), ("post", "/webhook")]
"""Every route of the ML backend protocol, as (requests/test-client method, path)."""


def read_csv(name: str, limit: int | None = None) -> list[dict]:
    """Rows of a shared data set, e.g. read_csv('ag_news/test.csv', 40)."""
    path = DATA_DIR / name
    if not path.is_file():  # a failure, not a skip: most tests need the data, and a run of skips looks green
        pytest.fail(f"shared data set {path} not found: the tests read ../shared/data next to the checkout")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rows[:limit] if limit else rows


class RedisServer:
    """A real redis-server process on a free port, in its own directory."""

    def __init__(self, directory: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._binary = binary
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self._binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    break  # exited: the port was taken, or redis-server refused its arguments
                time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server) -> str:
    """A flushed database on the session's real redis-server."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """Path of a tiny random BERT with a WordPiece vocab trained here: fast, offline, deterministic."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    corpus = [row["text"] for row in read_csv("ag_news/pool.csv", 2000)] + list(AG_NEWS_LABELS)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus, vocab_size=2000, min_frequency=2)
    wordpiece.save_model(str(folder))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=wordpiece.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def settings(tiny_bert, redis_url, tmp_path):
    from backend.config import Settings

    return Settings.from_env(
        {
            "MODEL_NAME": tiny_bert,
            "REDIS_URL": redis_url,
            "MODEL_DIR": str(tmp_path / "models"),
            "MAX_LENGTH": "64",
            "LOG_LEVEL": "DEBUG",
            "COMMITTEE_SIZE": "3",
            "QUEUE_NAME": "test-queue",
        }
    )


@pytest.fixture()
def runtime(settings):
    from backend.runtime import Runtime

    return Runtime(settings)


@pytest.fixture()
def client(runtime):
    from backend.api import create_app

    app = create_app(runtime)
    app.testing = True
    return app.test_client()

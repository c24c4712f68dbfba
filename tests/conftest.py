"""Shared fixtures: a tiny trained-looking model exported to a temporary artifacts directory."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest

import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.process import free_port  # noqa: F401 (re-exported for tests)
from sentiment.artifacts import export_artifacts
from sentiment.model import ModelConfig, SentimentLSTM
from sentiment.text import TokenizerSettings, Vocabulary

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "model_artifacts"

TINY_WORDS = ["good", "great", "bad", "awful", "movie", "film", "the", "was", "a", "!", ".", ","]


def make_tiny_artifacts(directory: Path, max_tokens: int = 32, seed: int = 0) -> Path:
    """Export a small random SentimentLSTM with a 14-token vocabulary (fast to load and run)."""
    torch.manual_seed(seed)
    vocab = Vocabulary.build([TINY_WORDS], TokenizerSettings(max_tokens=max_tokens), min_freq=1)
    model = SentimentLSTM(ModelConfig(len(vocab), embedding_dim=8, hidden_size=12))
    card = {"version": "tiny-test", "architecture": {"config": ModelConfig(len(vocab), 8, 12).to_dict()},
            "metrics": {"validation": {"accuracy": 0.5}}}
    return export_artifacts(model, vocab, card, directory)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_artifacts(tmp_path_factory.mktemp("tiny_artifacts"))


def shipped_available() -> bool:
    return (SHIPPED / "model.pt").is_file() and (SHIPPED / "model_card.json").is_file()


def write_fake_imdb(root: Path, n_per_class: int = 12, as_archive: bool = True) -> Path:
    """Write a tiny labelled corpus in the official aclImdb layout (folder, or .tar.gz of it)."""
    pos = ["a great film , wonderful acting and a great story", "good movie , i loved it <br /><br /> great !",
           "wonderful , moving and good"]
    neg = ["an awful film , boring and bad", "bad movie , i hated it <br /> awful !", "boring , dull and bad"]
    files: dict[str, str] = {}
    for split in ("train", "test"):
        for i in range(n_per_class):
            files[f"aclImdb/{split}/pos/{i}_{8 + i % 3}.txt"] = pos[i % 3] + f" number {i}"
            files[f"aclImdb/{split}/neg/{i}_{1 + i % 3}.txt"] = neg[i % 3] + f" number {i}"
    for i in range(4):
        files[f"aclImdb/train/unsup/{i}_0.txt"] = "a film about a movie " + pos[i % 3]
    # urls_<polarity>.txt: line i names review i's movie; three reviews of each label per movie, as
    # IMDB has both positive and negative reviews of one movie (test movies differ from train movies).
    for split, base in (("train", 1000), ("test", 5000)):
        for polarity in ("pos", "neg"):
            files[f"aclImdb/{split}/urls_{polarity}.txt"] = "".join(
                f"http://www.imdb.com/title/tt{base + i // 3:07d}/usercomments\n" for i in range(n_per_class))
    files["aclImdb/train/urls_unsup.txt"] = "".join(
        f"http://www.imdb.com/title/tt{9000 + i:07d}/usercomments\n" for i in range(4))
    files["aclImdb/README"] = "fake"
    if not as_archive:
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return root
    archive = root / "aclImdb_v1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


# ---- the app in-process (TestClient runs the lifespan: load → warm up → ready) -----------------

def wait_ready(client: TestClient, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready: {client.get('/health/ready').json()}")


@pytest.fixture
def make_client(tiny_artifacts: Path):
    clients = []

    def make(engine_factory=None, wait: bool = True, **overrides) -> TestClient:
        overrides.setdefault("workers", 0)  # in-process model: fast to start (tests/test_workers.py covers workers)
        settings = Settings(artifacts_dir=overrides.pop("artifacts_dir", tiny_artifacts), **overrides)
        client = TestClient(create_app(settings, engine_factory))
        client.__enter__()
        clients.append(client)
        if wait:
            wait_ready(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)



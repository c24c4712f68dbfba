"""Service configuration: one pydantic-settings object read from ``SENTIMENT_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ARTIFACTS = Path(__file__).resolve().parent.parent / "model_artifacts"


class Settings(BaseSettings):
    """Every knob of the service; each field is the env var ``SENTIMENT_<NAME>`` (see README)."""

    model_config = SettingsConfigDict(env_prefix="SENTIMENT_", extra="ignore")

    artifacts_dir: Path = Field(DEFAULT_ARTIFACTS, description="directory with model.pt, vocab.json, model_card.json")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    max_batch_size: int = Field(64, ge=1, description="most texts in one batch (1 turns batching off)")
    max_batch_tokens: int = Field(16_384, ge=1, description="most padded tokens in one forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="longest a batch waits to fill under concurrent load")
    max_queue: int = Field(1024, ge=1, description="most texts waiting; beyond it requests get 503")
    max_texts: int = Field(64, ge=1, description="most texts in one request")
    max_text_chars: int = Field(20_000, ge=1, description="longest text accepted, in characters")
    max_tokens: int | None = Field(None, ge=1, description="truncation length; default and ceiling: the model's")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer gets 504")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    shutdown_delay_s: float = Field(0.0, ge=0, description="after SIGTERM, report not-ready this long before closing")
    warmup: bool = Field(True, description="run warm-up passes before reporting ready")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()

"""Service configuration: one pydantic-settings object read from ``SENTIMENT_*`` environment variables.

Every setting of the service and of ``python -m app`` lives here, with its default and limits, and
the relations between settings are checked together at start-up, so a bad combination fails fast
with a message that names the variables.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_ARTIFACTS = Path(__file__).resolve().parent.parent / "model_artifacts"


class Settings(BaseSettings):
    """Every knob of the service; each field is the env var ``SENTIMENT_<NAME>`` (docs/configuration.md)."""

    model_config = SettingsConfigDict(env_prefix="SENTIMENT_", extra="ignore")

    # Model
    artifacts_dir: Path = Field(DEFAULT_ARTIFACTS, description="directory with model.pt, vocab.json, model_card.json")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    max_tokens: int | None = Field(None, ge=1, description="truncation length; default and ceiling: the model's")
    torch_threads: int | None = Field(None, ge=1, description=(
        "torch CPU threads of the model in the server process (workers = 0); each model worker uses 1"))
    workers: int | None = Field(None, ge=0, description=(
        "model-worker processes, each scoring whole batches on one core; default: one per usable core "
        "(CPU affinity, capped by the cgroup CPU quota) on CPU, 0 on CUDA; 0 scores in the server process"))
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field("auto", description=(
        "forward-pass arithmetic: auto (bf16 on a CPU with AVX-512 BF16 or AMX, fp32 elsewhere), fp32, bf16 "
        "(the LSTM in bfloat16, the head in float64: batch-invariant, same test accuracy) or int8 (dynamic "
        "quantisation, CPU only, not batch-invariant); docs/performance.md, \"Precision\""))
    warmup: bool = Field(True, description="run warm-up passes before reporting ready")
    # Batching
    max_batch_size: int = Field(64, ge=1, description="most texts in one batch (1 turns batching off)")
    max_batch_tokens: int = Field(16_384, ge=1, description="most padded tokens in one forward pass")
    max_wait_ms: float = Field(2.0, ge=0, description="longest a batch waits to fill under concurrent load")
    max_queue: int = Field(1024, ge=1, description=(
        "most queue items waiting in each lane (a text, or 32 positions of an explanation); beyond it requests "
        "get 503 (an empty lane takes any one request)"))
    max_batch_cost: float = Field(50_000, gt=0, description=(
        "most work in one batch, in characters (a gate trace counts 6×): keeps batches short, so a light "
        "request waits for at most one heavy batch"))
    max_queue_cost: float = Field(10_000_000, gt=0, description=(
        "most work waiting in each lane's queue, in characters (a gate trace counts 6×); beyond it requests "
        "get 503 (an empty lane takes any one request). The default is about 25 s of work for 2 model workers "
        "(~5 µs per character each): more could not be served within the default 30 s request timeout, and "
        "it bounds the queue before the wait estimate has measured anything"))
    # Lanes (interactive first; batch work keeps a share)
    batch_lane_share: float = Field(0.2, gt=0, lt=1, description=(
        "share of the model's work that the batch lane (\"priority\": \"batch\") keeps while interactive work "
        "also waits, so it is never starved; interactive work gets the rest and goes first"))
    batch_lane_batch_cost: float = Field(4_000, gt=0, description=(
        "most batch-lane work in one batch while interactive work is waiting or arrived in the last second, in "
        "characters (~3 IMDB reviews, ~20 ms on one core): an interactive request that finds every model "
        "worker busy waits for at most about that long"))
    # Explanations (occlusion: one forward pass of the text per token, without that token)
    max_explain_tokens: int | None = Field(None, ge=1, description=(
        "most tokens (after truncation) in a text asked to be explained; default and ceiling: max_tokens"))
    max_explain_texts: int = Field(8, ge=1, description="most texts in one request with \"explain\"")
    # Request limits
    max_texts: int = Field(64, ge=1, description="most texts in one request")
    max_text_chars: int = Field(20_000, ge=1, description="longest text accepted, in characters")
    max_word_chars: int = Field(200, ge=1, description=(
        "longest run of characters without whitespace accepted (spaCy's affix rules are quadratic in a "
        "word's length: one 20,000-character word of '!' takes a minute; IMDB's longest is 76)"))
    max_body_bytes: int | None = Field(None, ge=1, description=(
        "largest request body; default: the largest legal request (max_texts × max_text_chars × 12 bytes, "
        "every character a JSON \\u escape of a surrogate pair) plus 64 KiB"))
    max_body_bytes_in_flight: int | None = Field(None, ge=1, description=(
        "most request-body bytes held in memory at once, by all requests together; a request that would go "
        "over it gets 503 overloaded (one request alone is always taken); default: 4 × the body limit"))
    request_timeout_s: float = Field(30.0, gt=0, description=(
        "a request waiting longer gets 504; one predicted to wait longer is shed at once with 503; the most a "
        "request's own deadline (timeout_ms) may be"))
    # Access
    model_name: str = Field("sentiment", min_length=1, description="the model's name in the Open Inference Protocol (/v2/models/<name>)")
    api_key: SecretStr | None = Field(None, description="when set, prediction endpoints need 'Authorization: Bearer <key>'")
    api_keys_file: Path | None = Field(None, description=(
        "file of accepted API keys, one per line ('#' comments); must exist and hold a key, else start-up fails"))
    # Model repository (docs/releasing.md)
    model_repository: Path | None = Field(None, description=(
        "directory of artifact directories, one per model version (the directory's name is the version); the "
        "/v2/repository endpoints load, shadow and swap them (they exist only with an admin key)"))
    admin_key: SecretStr | None = Field(None, description=(
        "when set, the /v2/repository endpoints exist and need 'Authorization: Bearer <admin key>'; prediction "
        "keys never open them"))
    admin_keys_file: Path | None = Field(None, description=(
        "file of accepted admin keys, one per line ('#' comments); must exist and hold a key, else start-up fails"))
    # Faults
    stuck_batch_s: float = Field(60.0, gt=0, description="a batch running longer turns readiness 503 (model stuck)")
    stuck_liveness_s: float = Field(120.0, gt=0, description="a batch running longer fails liveness too (restart me)")
    batch_deadline_floor_s: float = Field(2.0, gt=0, description=(
        "shortest time a model worker gets for a batch; a batch's deadline is 8x its predicted duration at "
        "the measured throughput, within this floor and the cap. A worker past it is killed and replaced, "
        "and the batch's texts are scored again elsewhere"))
    batch_deadline_cap_s: float = Field(20.0, gt=0, description=(
        "longest time a model worker gets for a batch (also the deadline before any throughput is measured)"))
    poison_ttl_s: float = Field(3600.0, ge=0, description=(
        "how long a text that made a model worker fail twice (the second time alone) is refused with 422 "
        "text_crashed_worker without reaching a worker again"))
    # Process (python -m app)
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="uvicorn and service log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or one JSON object per line (docs/observability.md)")
    graceful_timeout_s: float = Field(30.0, gt=0, description="after SIGTERM, longest wait for in-flight requests")
    shutdown_delay_s: float = Field(0.0, ge=0, description="after SIGTERM, report not-ready this long before closing")

    @property
    def body_limit(self) -> int:
        """The request-body limit in force, in bytes."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_texts * self.max_text_chars * 12 + 65_536

    @property
    def body_bytes_in_flight_limit(self) -> int:
        """The cap on request-body bytes held at once, in bytes: four of the largest bodies by default
        (their parsed texts take up to ~4× their bytes in Python: ~250 MB at the default body limit)."""
        return self.max_body_bytes_in_flight if self.max_body_bytes_in_flight is not None else 4 * self.body_limit

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_queue < self.max_texts:
            raise ValueError(f"SENTIMENT_MAX_QUEUE ({self.max_queue}) must hold at least one full request "
                             f"(SENTIMENT_MAX_TEXTS = {self.max_texts})")
        if self.api_keys_file is not None and not self.api_keys_file.is_file():
            raise ValueError(f"SENTIMENT_API_KEYS_FILE ({self.api_keys_file}) is not a readable file")
        if self.admin_keys_file is not None and not self.admin_keys_file.is_file():
            raise ValueError(f"SENTIMENT_ADMIN_KEYS_FILE ({self.admin_keys_file}) is not a readable file")
        if self.model_repository is not None and not self.model_repository.is_dir():
            raise ValueError(f"SENTIMENT_MODEL_REPOSITORY ({self.model_repository}) is not a directory")
        if self.batch_deadline_cap_s < self.batch_deadline_floor_s:
            raise ValueError("SENTIMENT_BATCH_DEADLINE_CAP_S must be at least SENTIMENT_BATCH_DEADLINE_FLOOR_S")
        if self.stuck_liveness_s < self.stuck_batch_s:
            raise ValueError("SENTIMENT_STUCK_LIVENESS_S must be at least SENTIMENT_STUCK_BATCH_S: liveness fails "
                             "only after readiness has")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()

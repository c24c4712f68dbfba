"""Request and response bodies of the HTTP API, with the examples shown in the OpenAPI docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from sentiment import LABEL_THRESHOLD

EXAMPLE_TEXTS = [
    "A beautiful, moving film with a superb cast. I loved every minute of it.",
    "Two hours of my life I will never get back. The plot made no sense at all.",
]


def whole_number(value: Any) -> Any:
    """JSON Schema's ``integer``: an int, or a float without a fractional part (``2.0``); never a
    string or a boolean (pydantic's lax ints take both, its strict ints refuse ``2.0``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("must be a whole number")
    return value


class PredictRequest(BaseModel):
    """Texts to score. Limits (texts per request, characters per text) are service settings."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"texts": EXAMPLE_TEXTS, "trace": False}, {"texts": EXAMPLE_TEXTS[:1], "timeout_ms": 500},
                     {"texts": EXAMPLE_TEXTS, "priority": "batch"}],
        # Documents the validator below, so that generated clients and schema-driven tests know it.
        "if": {"properties": {"gates": {"const": True}}, "required": ["gates"]},
        "then": {"properties": {"trace": {"const": True}}, "required": ["trace"]}})

    # Each text must hold something besides whitespace (422 empty_text); the limits on count and
    # length are settings (413), listed by /v1/model.
    texts: list[str] = Field(..., min_length=1, description="reviews to score, in order",
                             json_schema_extra={"items": {"type": "string", "minLength": 1, "pattern": r"\S"}})
    trace: StrictBool = Field(False, description="also return the running probability after every token")
    gates: StrictBool = Field(False, description=(
        "with trace: also return the top LSTM layer's mean input/forget/output gate activation and "
        "cell-state norm after every token (recomputed step by step from the same weights; slower)"))

    explain: Literal["occlusion"] | None = Field(None, description=(
        '"occlusion": also return, for every token, how much P(positive) changes when that token is '
        "dropped from the text (one extra forward pass per token; see the limits in /v1/model)"))

    # The deadline's upper bound is a setting (SENTIMENT_REQUEST_TIMEOUT_S × 1000): app.routes writes it
    # into the OpenAPI document as this field's maximum and answers 422 above it.
    timeout_ms: int | None = Field(None, ge=1, description=(
        "this request's deadline, in milliseconds counted once its body is read: a request not answered by then gets 504 "
        "deadline_exceeded at once, and its texts still queued are dropped unscored (also at once when the "
        "estimated wait is already longer); at most the server's request timeout (SENTIMENT_REQUEST_TIMEOUT_S "
        "× 1000, 422 above); default: the request timeout (504 timeout)"))
    priority: Literal["interactive", "batch"] = Field("interactive", description=(
        '"interactive" (default): goes first; "batch": bulk work that can wait, with a bounded share of the '
        "model (SENTIMENT_BATCH_LANE_SHARE) while interactive work waits, so it is never starved"))

    @field_validator("timeout_ms", mode="before")
    @classmethod
    def _whole_number(cls, value: Any) -> Any:
        return whole_number(value)

    @model_validator(mode="after")
    def _gates_need_trace(self) -> "PredictRequest":
        if self.gates and not self.trace:
            raise ValueError('"gates": true needs "trace": true')
        return self


class GateTrace(BaseModel):
    """Inside the top LSTM layer after each token: mean gate activations (0–1) and the cell-state norm."""

    input: list[float] = Field(..., description="how much of the new candidate is written into the cell")
    forget: list[float] = Field(..., description="how much of the previous cell state is kept")
    output: list[float] = Field(..., description="how much of the cell state is exposed as the hidden state")
    cell_norm: list[float] = Field(..., description="L2 norm of the cell state (the LSTM's memory)")


class Trace(BaseModel):
    """The model's running sentiment: ``probabilities[i]`` is P(positive) after reading ``tokens[i]``."""

    tokens: list[str]
    probabilities: list[float]
    gates: GateTrace | None = Field(None, description='present when the request asked for "gates": true')


class Explanation(BaseModel):
    """Why the model decided: ``attributions[j]`` = P(positive | text) − P(positive | text without
    ``tokens[j]``). Positive values pushed towards "positive", negative towards "negative"."""

    method: Literal["occlusion"]
    tokens: list[str] = Field(..., description="the tokens the model read (the same as the trace's)")
    attributions: list[float] = Field(..., description="one per token, in [-1, 1]")


class Prediction(BaseModel):
    label: Literal["positive", "negative"] = Field(..., description=f"positive when probability >= {LABEL_THRESHOLD}")
    probability: float = Field(..., ge=0, le=1, description="P(positive) at the last token")
    num_tokens: int = Field(..., description="tokens the model read (after truncation)")
    truncated: bool = Field(..., description="true when the start of the text was cut to fit the token limit")
    total_tokens: int = Field(..., description="tokens in the whole text, before truncation")
    trace: Trace | None = Field(None, description="present when the request asked for it")
    explanation: Explanation | None = Field(None, description='present when the request asked for "explain"')


class ModelRef(BaseModel):
    version: str
    device: str


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": {"version": "sentiment-lstm-20261123-2010", "device": "cpu"},
        "predictions": [
            {"label": "positive", "probability": 0.97, "num_tokens": 16, "truncated": False, "total_tokens": 16,
             "trace": None, "explanation": None},
            {"label": "negative", "probability": 0.02, "num_tokens": 18, "truncated": False, "total_tokens": 18,
             "trace": None, "explanation": None},
        ],
    }]})

    model: ModelRef
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    version: str
    device: str
    precision: str = Field(..., description="forward-pass arithmetic in force: fp32 or bf16 (both batch-invariant), or int8")
    workers: int = Field(..., description="model-worker processes scoring batches (0: in the server process)")
    architecture: dict[str, Any]
    vocab_size: int
    tokenizer: dict[str, Any]
    max_tokens: int = Field(..., description="truncation length applied by this service")
    limits: dict[str, int] = Field(..., description="request limits in force (texts per request, characters per text)")
    metrics: dict[str, Any] = Field(..., description="validation and test metrics from the model card")
    training: dict[str, Any] = Field(default_factory=dict, description="time, hardware and epochs from the model card")
    shadow: dict[str, Any] | None = Field(None, description=(
        "the candidate version being shadowed, if any: version, fraction, texts, agreements, agreement_rate, "
        "mean_abs_delta, dropped, failed (docs/releasing.md)"))


class ErrorDetail(BaseModel):
    loc: list[str | int] = Field(default_factory=list, description="where in the request the problem is")
    msg: str


class ErrorBody(BaseModel):
    code: str = Field(..., description="stable machine-readable error code")
    message: str = Field(..., description="what is wrong, in words")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """A /v1 error."""

    error: ErrorBody


class OipError(BaseModel):
    """A /v2 error: the Open Inference Protocol's error object (the stable code is in ``X-Error-Code``)."""

    error: str = Field(..., description="what is wrong, in words")


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` written in place: an OpenAPI ``openapi_extra``
    request body cannot resolve ``#/$defs/...`` references (the models here are not recursive)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


class Health(BaseModel):
    status: str
    model_version: str | None = None
    device: str | None = None
    detail: str | None = None

"""The Open Inference Protocol's model-repository extension, as Triton implements it:

* ``POST /v2/repository/index``: every version of the model with its state (``serving``, ``shadow``,
  ``available``, ``invalid`` with the reason); ``{"ready": true}`` lists only the loaded ones;
* ``POST /v2/repository/models/{name}/load``: ``{"parameters": {"version": "<name>"}}`` swaps to that
  version; with ``"mode": "shadow"`` (and ``"shadow_fraction"``) it shadows it instead;
* ``POST /v2/repository/models/{name}/unload``: ends a shadow (``"version"`` optional).

The routes exist only when an admin key is configured (``SENTIMENT_ADMIN_KEY`` or
``SENTIMENT_ADMIN_KEYS_FILE``) and every one needs it as a bearer token; prediction keys get 403.
The work is :class:`app.model_control.ModelControl`'s, on a worker thread (a swap takes seconds).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import check_admin
from app.edge import parse_json, read_json_body
from app.errors import ApiError, Errors, openapi_responses
from app.model_control import ModelControl
from app.schemas import inline_schema


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ready: bool = Field(False, description="list only the loaded versions (serving and shadow)")


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(..., description="a version of the repository: the name of its directory", max_length=128)
    mode: Literal["serve", "shadow"] = Field("serve", description="serve it (a swap), or shadow it beside the served one")
    shadow_fraction: float | None = Field(None, gt=0, le=1, description="share of live texts the shadow scores (default 0.1)")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: LoadParameters


class UnloadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str | None = Field(None, description="the shadowed version (default: the shadow)", max_length=128)
    unload_dependents: bool = Field(False, description="accepted for Triton clients; this model has no dependents")


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parameters: UnloadParameters = Field(default_factory=UnloadParameters)


def _parser(model: type[BaseModel], empty_ok: bool) -> Callable[[bytes], Any]:
    """A parser of JSON bytes into ``model`` (an empty body is ``{}`` with ``empty_ok``): every
    problem is a 400 ``invalid_repository_request`` naming the field."""
    def parse(raw: bytes) -> Any:
        data = {} if empty_ok and not raw.strip() else parse_json(raw)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            summary = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                                for e in exc.errors(include_url=False, include_input=False)[:5])
            raise ApiError(Errors.INVALID_REPOSITORY_REQUEST, summary=summary) from None
    return parse


def require_admin(request: Request) -> None:
    """401 without a valid admin key, 403 with a prediction key (before the body is read)."""
    state = request.app.state
    check_admin(request.headers.get("authorization"), state.admin_digests, state.prediction_digests)


router = APIRouter(prefix="/v2/repository", tags=["model repository (v2)"], dependencies=[Depends(require_admin)])


def _control(request: Request, name: str | None = None) -> ModelControl:
    service = request.app.state.service
    if name is not None and name != service.settings.model_name:
        raise ApiError(Errors.MODEL_NOT_FOUND, detail=f"unknown model {name!r}; this server serves "
                       f"{service.settings.model_name!r}")
    return service.control


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"openapi_extra": {"requestBody": {"required": False, "content": {
        "application/json": {"schema": inline_schema(model)}}}}}


@router.post("/index", summary="Every version of the model in the repository, with its state",
             responses=openapi_responses(400, 401, 403, 415, protocol="v2"), **_body(IndexRequest))
async def index(request: Request) -> JSONResponse:
    body = await read_json_body(request, _parser(IndexRequest, empty_ok=True))
    return JSONResponse(await run_in_threadpool(_control(request).index, body.ready))


@router.post("/models/{name}/load", summary="Serve a version (a swap without downtime), or shadow it",
             responses=openapi_responses(400, 401, 403, 404, 409, 415, 422, 503, protocol="v2"), **_body(LoadRequest))
async def load(request: Request, name: str) -> JSONResponse:
    control = _control(request, name)
    params = (await read_json_body(request, _parser(LoadRequest, empty_ok=False))).parameters
    if params.mode == "serve" and params.shadow_fraction is not None:
        raise ApiError(Errors.INVALID_REPOSITORY_REQUEST, summary="parameters.shadow_fraction needs \"mode\": \"shadow\"")
    result = await run_in_threadpool(control.load, params.version, params.mode == "shadow", params.shadow_fraction)
    return JSONResponse(result)


@router.post("/models/{name}/unload", summary="End the shadow of a version",
             responses=openapi_responses(400, 401, 403, 404, 409, 415, protocol="v2"), **_body(UnloadRequest))
async def unload(request: Request, name: str) -> JSONResponse:
    control = _control(request, name)
    params = (await read_json_body(request, _parser(UnloadRequest, empty_ok=True))).parameters
    return JSONResponse(await run_in_threadpool(control.unload, params.version))

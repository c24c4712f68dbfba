"""Model control: load a version of the model repository beside the served one, shadow it, serve
it, and free the old one, without failing or pausing any accepted request.

How a swap keeps "each request is scored entirely by one version":

* every prediction takes the served version once (:meth:`VersionPins.hold`), and every queue item it
  makes, explanation chunks included, is pinned to that version (``ScoreRequest.version``); the
  scorer routes an item only to workers of its version, and an engine refuses any other;
* the served version changes only inside :meth:`VersionPins.flip`, under the lock :meth:`hold`
  takes, so a request holds either the old version or the new one, never a version it read before
  the flip and counted after it;
* the old version is freed only once no request holding it is outstanding (its queued and running
  items are done), by the scorer's ``retire``, which also bounds memory (docs/releasing.md).

One operation at a time (a second gets 409); each is blocking and runs on a worker thread.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from app.errors import ApiError, Errors
from app.repository import VERSION_NAME, ModelRepository
from app.scorer import CandidateError, ModelSummary
from app.shadow import Shadow

if TYPE_CHECKING:
    from app.lifecycle import Lifecycle
    from app.metrics import ServiceMetrics
    from app.settings import Settings

log = logging.getLogger("app.model_control")
DEFAULT_SHADOW_FRACTION = 0.1


class VersionPins:
    """Prediction requests outstanding per model version, and the one place the served version changes."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._outstanding: dict[str, int] = {}

    def hold(self, serving: Callable[[], ModelSummary]) -> ModelSummary:
        """The served version (``serving()``, which may raise), counted until :meth:`release`."""
        with self._changed:
            model = serving()
            self._outstanding[model.version] = self._outstanding.get(model.version, 0) + 1
            return model

    def release(self, version: str) -> None:
        with self._changed:
            left = self._outstanding[version] - 1
            if left:
                self._outstanding[version] = left
            else:
                del self._outstanding[version]
                self._changed.notify_all()

    def outstanding(self, version: str) -> int:
        """Requests holding ``version`` now."""
        with self._changed:
            return self._outstanding.get(version, 0)

    def flip(self, change: Callable[[], Any]) -> None:
        """Run ``change`` (which makes another version the served one) where no :meth:`hold` interleaves."""
        with self._changed:
            change()

    def wait_until_free(self, version: str, timeout_s: float) -> bool:
        """Wait until no request holds ``version`` (False if some still do after ``timeout_s``)."""
        with self._changed:
            return self._changed.wait_for(lambda: version not in self._outstanding, timeout_s)


class ModelControl:
    """The model repository's operations: index, load (serve or shadow), unload."""

    def __init__(self, settings: Settings, lifecycle: Lifecycle, metrics: ServiceMetrics, pins: VersionPins) -> None:
        self.settings, self.lifecycle, self.metrics, self.pins = settings, lifecycle, metrics, pins
        self.repository = ModelRepository(settings.model_repository)
        self.shadow: Shadow | None = None
        self._busy = threading.Lock()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise ApiError(Errors.REPOSITORY_CONFLICT, detail="another repository operation (a load or an unload) "
                           "is running; retry once it has finished")
        try:
            yield
        finally:
            self._busy.release()

    # ---- the index ----------------------------------------------------------------------------
    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every version: ``serving``, ``shadow``, ``available`` or ``invalid`` (with the reason)."""
        serving = self.lifecycle.model
        shadow = self.shadow
        name = self.settings.model_name
        out: list[dict[str, Any]] = []
        entries = self.repository.entries()
        if serving is not None and serving.version not in {e.name for e in entries}:
            out.append({"name": name, "version": serving.version, "state": "serving",
                        "reason": "loaded from SENTIMENT_ARTIFACTS_DIR, outside the model repository"})
        for entry in entries:
            item: dict[str, Any] = {"name": name, "version": entry.name}
            if serving is not None and entry.name == serving.version:
                item["state"] = "serving"
            elif shadow is not None and entry.name == shadow.version:
                item["state"] = "shadow"
                item["shadow"] = shadow.summary()
            elif entry.problem is not None:
                item["state"], item["reason"] = "invalid", entry.problem
            else:
                item["state"] = "available"
            out.append(item)
        return [e for e in out if e["state"] in ("serving", "shadow")] if ready_only else out

    # ---- load -----------------------------------------------------------------------------------
    def load(self, version: str, shadow: bool = False, fraction: float | None = None) -> dict[str, Any]:
        """Serve ``version`` (swap), or with ``shadow`` score ``fraction`` of live texts on it as well."""
        with self._exclusive():
            serving = self.lifecycle.require_serving()
            if shadow:
                return self._start_shadow(serving, version, fraction or DEFAULT_SHADOW_FRACTION)
            return self._serve(serving, version)

    def _candidate(self, version: str, shadow: bool) -> ModelSummary:
        """Load ``version`` beside the served one, completely checked; 422 naming what is wrong."""
        path = self.repository.resolve(version)
        try:
            return self.lifecycle.scorer.add_version(str(path), version, shadow)
        except CandidateError as exc:
            self.metrics.model_loads.labels(outcome="refused").inc()
            # Named relative to the version's directory: the operator knows where the repository is.
            reason = str(exc).replace(str(path) + os.sep, "").replace(str(path), version)
            log.error("model version %s refused: %s", version, reason)
            raise ApiError(Errors.INVALID_MODEL_VERSION, version=version, reason=reason) from None

    def _start_shadow(self, serving: ModelSummary, version: str, fraction: float) -> dict[str, Any]:
        if version == serving.version:
            raise ApiError(Errors.REPOSITORY_CONFLICT, detail=f"version {version!r} is the one served; a shadow "
                           "must be another version")
        if self.shadow is not None and self.shadow.version != version:
            raise ApiError(Errors.REPOSITORY_CONFLICT, detail=f"version {self.shadow.version!r} is being shadowed; "
                           "unload it first")
        if self.shadow is not None:  # the same version again: a new fraction
            self.shadow.fraction = fraction
            self.metrics.shadow_fraction.set(fraction)
        else:
            self._candidate(version, shadow=True)
            scorer = self.lifecycle.scorer
            self.shadow = Shadow(version, fraction, lambda requests: scorer.score(requests, retry=False), self.metrics)
            self.metrics.model_loads.labels(outcome="shadow").inc()
            log.info("shadowing version %s on %.0f%% of live texts", version, fraction * 100)
        return {"name": self.settings.model_name, "version": version, "state": "shadow", "shadow": self.shadow.summary()}

    def _serve(self, serving: ModelSummary, version: str) -> dict[str, Any]:
        answer: dict[str, Any] = {"name": self.settings.model_name, "version": version, "state": "serving"}
        if version == serving.version:
            return {**answer, "changed": False}
        scorer = self.lifecycle.scorer
        if self.shadow is not None and self.shadow.version == version:  # promote: it is loaded and measured
            self.shadow.stop()
            self.shadow.join(5)
            answer["shadow"] = self.shadow.summary()
            self.shadow = None
        else:
            if version in scorer.versions():  # e.g. a retired version's worker that has not exited yet
                raise ApiError(Errors.REPOSITORY_CONFLICT, detail=f"version {version!r} is still being freed; retry")
            self._candidate(version, shadow=False)
        self.pins.flip(lambda: self.lifecycle.serve(scorer.promote(version)))
        log.info("version %s serves; draining version %s", version, serving.version)
        if not self.pins.wait_until_free(serving.version, self.settings.request_timeout_s + 5):
            log.warning("requests holding version %s outlived the request timeout; freeing it anyway", serving.version)
        scorer.retire(serving.version)
        self.metrics.model_loads.labels(outcome="promoted").inc()
        log.info("version %s freed; version %s serves alone", serving.version, version)
        return {**answer, "changed": True, "previous": serving.version}

    # ---- unload ---------------------------------------------------------------------------------
    def unload(self, version: str | None) -> dict[str, Any]:
        """End the shadow of ``version`` (default: the shadow); the served version cannot be unloaded."""
        with self._exclusive():
            serving = self.lifecycle.model
            if version is None and self.shadow is None:
                raise ApiError(Errors.REPOSITORY_CONFLICT, detail="nothing to unload: no shadow runs, and the served "
                               "version cannot be unloaded (load another version to replace it)")
            if version is None:
                version = self.shadow.version
            elif not VERSION_NAME.fullmatch(version):
                self.repository.resolve(version)  # the 400 that says what a version name is
            answer: dict[str, Any] = {"name": self.settings.model_name, "version": version, "state": "available"}
            if serving is not None and version == serving.version:
                raise ApiError(Errors.REPOSITORY_CONFLICT, detail=(
                    f"version {version!r} is the one served and cannot be unloaded: load another version to "
                    "replace it"))
            if self.shadow is None or self.shadow.version != version:
                if version not in self.repository.names():
                    raise ApiError(Errors.MODEL_NOT_FOUND, detail=f"the model repository has no version {version!r}")
                return {**answer, "changed": False}
            shadow, self.shadow = self.shadow, None
            shadow.stop()
            self.lifecycle.scorer.drop(version)  # also wakes the shadow thread if it waits for that worker
            shadow.join()
            answer["shadow"] = shadow.summary()
            self.metrics.model_loads.labels(outcome="unloaded").inc()
            log.info("shadow of version %s ended", version)
            return {**answer, "changed": True}

    def close(self) -> None:
        """Stop the shadow (before the scorer closes)."""
        if self.shadow is not None:
            self.shadow.stop()

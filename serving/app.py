"""The HTTP API (FastAPI, served by uvicorn on loopback by default).

* ``POST /predict`` ``{"impressions": [Impression, ...]}`` -> ``{"probabilities": [...],
  "version": N}``; a request that does not fit the impression schema -> 422 naming the record
  and field; a body over ``RequestLimits.max_body_bytes`` or over ``max_impressions`` impressions
  -> 413 naming the limit (the body is read no further); before any model is loaded -> 503.
* ``GET /healthz`` -> 200 ``{"ok": true, "version": N}`` once a model is loaded, else 503.
* ``GET /metrics`` -> model version, newest event time applied, seconds behind the trainer
  (publish time of the newest version in the manifest minus that of the version applied), the
  last refused version's error.

A background thread polls the model directory every ``poll_s`` seconds for new versions.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from serving.model import BadRequest, ServingModel
from trainer.publish import ModelDirError


@dataclass(frozen=True)
class RequestLimits:
    """What one prediction request may hold (a larger one is answered 413)."""

    max_body_bytes: int = 16 << 20
    max_impressions: int = 10_000


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_app(model: ServingModel, poll_s: float = 1.0, limits: RequestLimits = RequestLimits()) -> FastAPI:
    app = FastAPI(title="streamrec serving")
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                model.refresh()
            except (ModelDirError, OSError) as exc:
                model.last_error = str(exc)
            except Exception as exc:  # the poller never dies: whatever went wrong shows in /metrics
                model.last_error = f"polling failed: {type(exc).__name__}: {exc}"
            stop.wait(poll_s)

    @app.on_event("startup")
    def start_polling() -> None:
        threading.Thread(target=poll, name="model-poller", daemon=True).start()

    @app.on_event("shutdown")
    def stop_polling() -> None:
        stop.set()

    @app.post("/predict")
    async def predict(request: Request):
        raw = await _read_body(request, limits.max_body_bytes)
        if raw is None:
            return JSONResponse({"error": f"request body over {limits.max_body_bytes} bytes (--max-body-bytes)"},
                                status_code=413)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            return JSONResponse({"error": f"body is not JSON: {str(exc)[:200]}"}, status_code=422)
        if not isinstance(body, dict) or "impressions" not in body:
            return JSONResponse({"error": "body must be a JSON object with an 'impressions' list"}, status_code=422)
        impressions = body["impressions"]
        if isinstance(impressions, list) and len(impressions) > limits.max_impressions:
            return JSONResponse({"error": f"{len(impressions)} impressions, at most {limits.max_impressions} per "
                                          f"request (--max-impressions)"}, status_code=413)
        try:
            probabilities, version = await run_in_threadpool(model.predict, impressions)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        except ModelDirError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return {"probabilities": probabilities.tolist(), "version": version}

    @app.get("/healthz")
    def healthz():
        if model.model is None:
            return JSONResponse({"ok": False, "error": model.last_error or "no model loaded yet"}, status_code=503)
        return {"ok": True, "version": model.version}

    @app.get("/metrics")
    def metrics():
        return model.status()

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8080, poll_s: float = 1.0, device: str = "cpu",
          fp16: bool = False, store: str | None = None, limits: RequestLimits = RequestLimits()) -> None:
    import uvicorn

    model = ServingModel(model_dir, device=device, fp16=fp16, store=store)
    try:
        model.refresh()
    except ModelDirError as exc:  # nothing published yet: the poller picks it up later
        print(f"serving: {exc}; waiting for a snapshot", flush=True)
    uvicorn.run(create_app(model, poll_s, limits), host=host, port=port, log_level="warning")

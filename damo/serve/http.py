"""The FastAPI app under the ingress: error shapes, the body-size limit and bearer auth.

Kept apart from the Serve deployments (damo.serve.app) so that Ray pickles these functions by
reference: the ingress replica and they then share one `settings` object.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from damo.serve.errors import ApiError
from damo.serve.schemas import ErrorBody

ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Bad input"),
        (401, "Missing or wrong bearer token"),
        (403, "Video not allowed"),
        (404, "Video or model not found"),
        (413, "Video or request beyond a limit"),
        (422, "Invalid request or unusable video"),
        (503, "Overloaded: retry after Retry-After seconds"),
        (504, "Took longer than the time limit"),
    )
}


class Settings:
    """What the ingress replica configured: the token and the request size limit."""

    token: str | None = None
    max_body_bytes: int | None = None


settings = Settings()

api = FastAPI(
    title="DaMO",
    version="1",
    description="Temporal grounding and video QA with DaMO, an audio-visual Video LLM. "
    "Videos are allowed storage URIs or uploads as data: URLs.",
)
bearer = HTTPBearer(auto_error=False, description="Needed when the service has a token.")


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return _error(err)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    for item in err.errors()[:8]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return _error(ApiError(422, "invalid_request", "; ".join(problems) or "invalid request"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return _error(ApiError(err.status_code, code, str(err.detail), dict(err.headers or {})))


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    # no stack trace leaves the service; the replica's log has it
    return _error(ApiError(500, "internal_error", f"internal error ({type(err).__name__})"))


@api.middleware("http")
async def _body_limit(request: Request, call_next):
    limit = settings.max_body_bytes
    length = request.headers.get("content-length")
    if limit and length is not None:
        if not length.isdigit():
            return _error(ApiError(400, "bad_content_length", "Content-Length is not a number"))
        if int(length) > limit:
            return _error(
                ApiError(
                    413,
                    "request_too_large",
                    f"the request has {int(length)} bytes; the limit is {limit}",
                )
            )
    return await call_next(request)


def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    token = settings.token
    if not token:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing bearer token" if credentials is None else "wrong bearer token",
            {"WWW-Authenticate": "Bearer"},
        )

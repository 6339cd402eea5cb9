"""RFC 9457 problem+json errors: one clear sentence for the user, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("vpnfleet.api")

PROBLEM = "application/problem+json"


class Problem(Exception):
    """An error the API reports to the caller as problem+json."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra


def not_found(what: str, key: object) -> Problem:
    return Problem(404, "Not found", f"{what} {key!r} does not exist")


def conflict(detail: str) -> Problem:
    return Problem(409, "Conflict", detail)


def bad_request(detail: str) -> Problem:
    return Problem(400, "Bad request", detail)


_UNSTORABLE = (
    "a value is out of range, too long for its field, or holds text the database cannot "
    "store; nothing was written"
)


def problem_response(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


# Pages under this prefix (the web console) answer errors as an HTML page: the renderer is
# set by controlplane/console at start (app.state.html_errors).
HTML_PREFIX = "/console"


def _respond(req: Request, status: int, title: str, detail: str, **extra: Any) -> Response:
    render = getattr(req.app.state, "html_errors", None)
    if render is not None and req.url.path.startswith(HTML_PREFIX):
        response: Response = render(req, status, title, detail)
        return response
    return problem_response(status, title, detail, **extra)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into problem+json."""

    @app.exception_handler(Problem)
    async def _problem(req: Request, exc: Problem) -> Response:
        return _respond(req, exc.status, exc.title, exc.detail, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError) -> Response:
        # Endpoints that check the token in their handler (controlplane/state.py): a refused
        # token is answered as such, not hidden behind the body's 422.
        refusal = getattr(req.app.state, "token_refusal", None)
        if refusal is not None and (refused := await refusal(req)) is not None:
            return await _problem(req, refused)
        errors = []
        for err in exc.errors():
            msg = str(err.get("msg", "invalid"))
            # pydantic prefixes our own ValueError messages; users need only the sentence.
            msg = msg.removeprefix("Value error, ")
            errors.append({"field": _field(err.get("loc", ())), "message": msg})
        if errors and errors[0]["message"] == "JSON decode error":
            detail = "the request body is not valid JSON"
        else:
            detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
        return _respond(req, 422, "Invalid request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> Response:
        title = {
            401: "Unauthorized",
            403: "Forbidden",
            404: "Not found",
            405: "Method not allowed",
            413: "Request body too large",
        }
        headers = getattr(exc, "headers", None)
        resp = _respond(req, exc.status_code, title.get(exc.status_code, "Error"), str(exc.detail))
        if headers:
            resp.headers.update(headers)
        return resp

    @app.exception_handler(IntegrityError)
    async def _integrity(req: Request, exc: IntegrityError) -> Response:
        # A race lost against a unique constraint: the other request won, nothing was written.
        log.info("integrity conflict: %s", type(exc.orig).__name__)
        return _respond(req, 409, "Conflict", "the change conflicts with existing data")

    # Safety nets: input the schemas should have refused but a database did not take (a value
    # out of range, too long for its column, or text it cannot store). Nothing was written:
    # the request's transaction is rolled back. Logged, since each is a schema to tighten.
    @app.exception_handler(DataError)
    async def _data(req: Request, exc: DataError) -> Response:
        log.warning("database refused a value on %s %s: %s", req.method, req.url.path,
                    type(exc.orig).__name__)  # fmt: skip
        return _respond(req, 422, "Invalid request", _UNSTORABLE)

    @app.exception_handler(StatementError)
    async def _statement(req: Request, exc: StatementError) -> Response:
        if not isinstance(exc.orig, OverflowError | UnicodeError | ValueError):
            raise exc
        log.warning("database refused a value on %s %s: %s", req.method, req.url.path,
                    type(exc.orig).__name__)  # fmt: skip
        return _respond(req, 422, "Invalid request", _UNSTORABLE)

    @app.exception_handler(OperationalError)
    async def _db_down(req: Request, exc: OperationalError) -> Response:
        log.error("database error: %s", type(exc.orig).__name__)
        return _respond(req, 503, "Database unavailable", "the database is unavailable")

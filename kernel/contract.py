"""The admin API's contract in the OpenAPI document, whichever service adds a route.

Guarantees of ``/openapi.json`` (applied to the merged document on every request, so
routes added later, by any service, inherit them):

- the bearer scheme ``adminToken`` is declared, and every ``/admin`` operation requires it;
- every ``/admin`` operation documents the refusals any admin route can give (401, 403,
  413, 503), 400 and 408 where it takes a body (malformed; stalled or dripped) and,
  where it validates parameters or a body, 422 as ``anyOf`` the shared
  :class:`ErrorBody` model (``Error``) and FastAPI's ``HTTPValidationError``;
- every other refusal a route declares (``responses=error_responses(404, 409, 504)``)
  uses ``Error``: one model for all refusals, ``{"detail": str, ...}``.

:func:`link` declares OpenAPI links from list routes to their items, which clients and
schemathesis' stateful phase follow. :func:`without_admin` is the document anonymous
clients see when ``http.private_docs`` is on.
"""

from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import (
    validation_error_definition,
    validation_error_response_definition,
)
from pydantic import BaseModel, ConfigDict, Field

from kernel.guard import is_admin_path

__all__ = [
    "ADMIN_ERRORS",
    "SECURITY_SCHEME",
    "ErrorBody",
    "admin_contract",
    "error_responses",
    "link",
    "without_admin",
]


class ErrorBody(BaseModel):
    """The body of every refusal: ``detail`` says what was refused and why.

    When an outcome event refused the request (a failed reload, a refused task run),
    ``outcome`` names its type and the event's fields come along.
    """

    model_config = ConfigDict(extra="allow", title="Error")

    detail: str = Field(description="what was refused and why, naming the culprit")
    outcome: str | None = Field(
        default=None, description="the type of the outcome event that refused the request"
    )


#: What each refusal means, for the OpenAPI document.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed",
    401: "No admin token, or a wrong one (authentication happens before the body is read)",
    403: "The token lacks the scope this route needs (admin:read or admin:write)",
    404: "No such resource",
    408: "The client stopped sending its body, or sent it slower than the minimum rate",
    409: "The resource is not in a state that allows this (or an outcome event refused it)",
    413: "The request body exceeds the route's limit",
    422: "The request is invalid, or its outcome event is a failure",
    503: "The admin service or the event log is unavailable",
    504: "No outcome event came in time",
}

#: Refusals any admin route can give, added to every admin operation.
ADMIN_ERRORS = (401, 403, 413, 503)
SECURITY_SCHEME = "adminToken"


def link(path: str, method: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link from a response to ``method path`` (its full path, with /admin).

    ``parameters`` map the target's parameters to runtime expressions such as
    ``"$response.body#/0/name"``: clients and schemathesis' stateful phase follow them.
    """
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method.lower()}", "parameters": parameters}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: these refusals, documented with ErrorBody."""
    return {
        code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS.get(code, "Refused")}
        for code in codes
    }


def admin_contract(paths: dict[str, Any], components: dict[str, dict[str, Any]]) -> None:
    """Declare the bearer scheme and the standard refusals on every /admin operation."""
    schemas = components.setdefault("schemas", {})
    schemas.setdefault("Error", ErrorBody.model_json_schema())
    schemas.setdefault("ValidationError", validation_error_definition)
    schemas.setdefault("HTTPValidationError", validation_error_response_definition)
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the admin token: 'Authorization: Bearer <token>'",
    }
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in paths.items():
        if not is_admin_path(path):
            continue
        for method, op in item.items():
            if method not in _METHODS or not isinstance(op, dict):
                continue
            op["security"] = [{SECURITY_SCHEME: []}]
            responses = op.setdefault("responses", {})
            for code in ADMIN_ERRORS:
                responses.setdefault(str(code), _error_response(code, error))
            if "requestBody" in op:  # a body that is not what it claims (bad JSON)...
                responses.setdefault("400", _error_response(400, error))
                # ...or that stalls or drips (the request guard's body timeouts)
                responses.setdefault("408", _error_response(408, error))
            validated = op.get("parameters") or op.get("requestBody")
            if "422" in responses or validated:
                refused = _error_response(422, error)
                refused["content"]["application/json"]["schema"] = {
                    "anyOf": [error, {"$ref": "#/components/schemas/HTTPValidationError"}]
                }
                responses["422"] = refused
            for code, response in responses.items():  # declared refusals: the shared model
                if code[:1] in "45" and code != "422":
                    content = response.setdefault("content", {})
                    content["application/json"] = {"schema": error}
    for name in [n for n in schemas if n == "ErrorBody"]:
        del schemas[name]  # routes that declared ErrorBody now point at "Error"


_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _error_response(code: int, error: dict[str, str]) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS.get(code, "Refused"),
        "content": {"application/json": {"schema": dict(error)}},
    }


def without_admin(schema: dict[str, Any]) -> dict[str, Any]:
    """The document without its /admin paths and the schemas only they use."""
    paths = {p: item for p, item in schema.get("paths", {}).items() if not is_admin_path(p)}
    components = dict(schema.get("components", {}))
    schemas = components.get("schemas", {})
    used: set[str] = set()
    todo: list[Any] = [paths]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in used and name in schemas:
                    used.add(name)
                    todo.append(schemas[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    components["schemas"] = {k: v for k, v in schemas.items() if k in used}
    components.pop("securitySchemes", None)
    return {**schema, "paths": paths, "components": components}

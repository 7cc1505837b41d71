"""Routes declared once: registered with Flask, validated with their models, documented.

Each operation of the API is an :class:`Operation`: its method and path, the
pydantic models of its query and body, and its responses. :meth:`Api.route`
registers the view with the blueprint and keeps the operation, and
:meth:`Api.document` builds the OpenAPI 3.1 document from the operations and
the JSON Schemas pydantic generates from the same models. Nothing of the
document is written by hand, so it cannot drift from what is validated.

(flask-openapi3 and spectree do this too, but both validate every declared
body kind on each request — one route cannot take JSON *or* multipart — and
build JSON Schemas per request; this module is the small part they would
replace, and pydantic does the schema work.)
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, request
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from webhooks.problems import MEDIA_TYPE as PROBLEM
from webhooks.problems import ProblemError
from webhooks.v1.schemas import Problem

REF = "#/components/schemas/{model}"
View = Callable[..., Any]


@dataclass(frozen=True)
class Param:
    """A path parameter or a request header, as the document describes it."""

    name: str
    schema: Mapping[str, Any]
    description: str = ""
    required: bool = True


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # OpenAPI form, relative to the blueprint: /jobs/{job_id}
    operation_id: str
    summary: str
    # status -> (description, model of its JSON body or None); response_media overrides
    responses: Mapping[int, tuple[str, type[BaseModel] | None]]
    description: str = ""
    path_params: tuple[Param, ...] = ()
    headers: tuple[Param, ...] = ()
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    form: type[BaseModel] | None = None
    public: bool = False
    response_headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)
    response_media: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def flask_rule(self) -> str:
        rule = self.path
        for param in self.path_params:
            converter = "int:" if param.schema.get("type") == "integer" else ""
            rule = rule.replace("{" + param.name + "}", f"<{converter}{param.name}>")
        return rule


def field_of(error: ValidationError, prefix: str = "") -> tuple[str, str]:
    """The first error of a validation as (field, message). The field is the top-level
    name (the requests are flat); where inside it, pydantic's location, goes in the
    message (it names union members and dict keys in its own way)."""
    first = error.errors(include_url=False)[0]
    location = [str(part) for part in first["loc"]]
    if not location:
        return prefix + "body", first["msg"]
    inside = f" (at {'.'.join(location[1:])})" if len(location) > 1 else ""
    return prefix + location[0], first["msg"] + inside


def validated(model: type[BaseModel], data: object, prefix: str = "") -> Any:
    """``data`` as ``model``, or a 400 problem naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        name, message = field_of(exc, prefix)
        raise ProblemError(400, f"{name}: {message}", field=name) from None


def query_of(model: type[BaseModel]) -> Any:
    """The request's query string as ``model`` (repeated names for list fields)."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if typing.get_origin(info.annotation) is list:
            found = request.args.getlist(name)
            if found:
                values[name] = found
        elif name in request.args:
            values[name] = request.args[name]
    return validated(model, values)


class Api:
    """A blueprint whose routes are operations of one OpenAPI document."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.operations: list[Operation] = []

    def route(self, operation: Operation) -> Callable[[View], View]:
        def register(view: View) -> View:
            self.blueprint.add_url_rule(
                operation.flask_rule,
                endpoint=operation.operation_id,
                view_func=view,
                methods=[operation.method],
            )
            self.operations.append(operation)
            return view

        return register

    def public_endpoints(self) -> frozenset[str]:
        return frozenset(
            f"{self.blueprint.name}.{op.operation_id}" for op in self.operations if op.public
        )

    def document(
        self, *, title: str, version: str, description: str, server: str
    ) -> dict[str, Any]:
        models: set[tuple[type[BaseModel], str]] = {(Problem, "serialization")}
        for op in self.operations:
            for model in (op.body, op.form):
                if model is not None:
                    models.add((model, "validation"))
            for _, model in op.responses.values():
                if model is not None:
                    models.add((model, "serialization"))
        ordered = sorted(models, key=lambda pair: pair[0].__name__)
        _, schemas = models_json_schema(ordered, ref_template=REF)  # type: ignore[arg-type]
        components: dict[str, Any] = dict(schemas.get("$defs", {}))
        paths: dict[str, dict[str, Any]] = {}
        prefix = self.blueprint.url_prefix or ""
        for op in self.operations:
            paths.setdefault(prefix + op.path, {})[op.method.lower()] = _operation(op, components)
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": version, "description": description},
            "servers": [{"url": server}],
            "paths": paths,
            "components": {
                "schemas": components,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A token from `variflow tokens create NAME`.",
                    }
                },
            },
            "security": [{"bearer": []}],
        }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _operation(op: Operation, components: dict[str, Any]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {
            "name": p.name,
            "in": "path",
            "required": True,
            "schema": dict(p.schema),
            "description": p.description,
        }
        for p in op.path_params
    ]
    parameters += [
        {
            "name": h.name,
            "in": "header",
            "required": h.required,
            "schema": dict(h.schema),
            "description": h.description,
        }
        for h in op.headers
    ]
    if op.query is not None:
        schema = op.query.model_json_schema(ref_template=REF)
        components.update(schema.pop("$defs", {}))
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            parameter: dict[str, Any] = {
                "name": name,
                "in": "query",
                "required": name in required,
                "schema": {k: v for k, v in prop.items() if k not in ("title", "description")},
            }
            if "description" in prop:
                parameter["description"] = prop["description"]
            if prop.get("type") == "array":
                parameter.update(style="form", explode=True)
            parameters.append(parameter)
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "parameters": parameters,
        "responses": {},
    }
    if op.description:
        document["description"] = op.description
    if op.public:
        document["security"] = []
    content: dict[str, Any] = {}
    if op.body is not None:
        content["application/json"] = {"schema": _ref(op.body)}
    if op.form is not None:
        content["multipart/form-data"] = {"schema": _ref(op.form)}
    if content:
        document["requestBody"] = {"required": op.body is not None, "content": content}
    for status, (description, model) in sorted(op.responses.items()):
        answer: dict[str, Any] = {"description": description}
        if status in op.response_media:
            answer["content"] = dict(op.response_media[status])
        elif model is not None:
            media = PROBLEM if model is Problem else "application/json"
            answer["content"] = {media: {"schema": _ref(model)}}
        if status in op.response_headers:
            answer["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in op.response_headers[status].items()
            }
        document["responses"][str(status)] = answer
    return document

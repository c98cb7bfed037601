"""Request and response models of the prediction API; they are also its OpenAPI documentation.

Numbers must be finite JSON numbers: Python's `json` accepts the non-standard literals `NaN` and
`Infinity` (and turns `1e999` into infinity), so the models refuse non-finite values explicitly
(422 naming the field). Strings are never coerced to numbers, nor booleans. A field value is a
finite number or a string (a category).

Every rule is one pydantic-core knows (lengths, strict types, finiteness): a request is validated
in Rust, with no Python call per field (a batch of 100 rows of 6 fields: ~320 -> ~130 µs). A field
value's two branches each report their error; `field_value_errors` makes them one, at the field.
Text must be valid UTF-8: pydantic's JSON parser refuses a lone surrogate escape outright, and the
route's fallback through Python's `json` (app.py) finds it with `lone_surrogate_at`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Id = Annotated[str, Field(min_length=1, max_length=256)]
FieldName = Annotated[str, Field(max_length=256)]
FieldValue = FiniteFloat | StrictStr  # a number (ints become floats), or text: a category


def field_value_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic's errors with the two union branches of a field value (`fields.<name>.float`,
    `fields.<name>.str`) made one error at the field itself: `finite_number` for a number out of
    range, else `number_or_string`.

        >>> field_value_errors([
        ...     {"type": "finite_number", "loc": ("fields", "a", "float"), "msg": "...", "input": float("inf")},
        ...     {"type": "string_type", "loc": ("fields", "a", "str"), "msg": "...", "input": float("inf")}])
        [{'type': 'finite_number', 'loc': ('fields', 'a'), 'msg': 'Input should be a finite number'}]
    """
    def field_of(loc: tuple) -> tuple | None:  # the field's loc, for an error of one of its branches
        return loc[:-1] if len(loc) >= 3 and loc[-3] == "fields" and loc[-1] in ("float", "str") else None

    branches: dict[tuple, dict[str, dict[str, Any]]] = {}  # the field's loc -> its branches' errors
    for e in errors:
        at = field_of(e["loc"])
        if at is not None:
            branches.setdefault(at, {})[e["loc"][-1]] = e
    out, merged = [], set()
    for e in errors:
        at = field_of(e["loc"])
        if at is None:
            out.append(e)
            continue
        if at in merged:  # its other branch's error: said already
            continue
        merged.add(at)
        number = branches[at].get("float", {})
        if number.get("type") == "finite_number" or (
                number.get("type") == "float_type" and type(number.get("input")) is int):  # beyond a double
            out.append({"type": "finite_number", "loc": at, "msg": "Input should be a finite number"})
        else:
            out.append({"type": "number_or_string", "loc": at, "msg": "Input should be a number or a string (a category)"})
    return out


def lone_surrogate_at(value: Any, loc: tuple = ()) -> tuple | None:
    """Where a decoded JSON value holds text that is not valid UTF-8 (a lone surrogate, which can
    become neither a Redis key nor an Avro string), as pydantic would name it; None if nowhere.

        >>> lone_surrogate_at({"entity_id": "e", "fields": {"\\udc00": 1.0}})
        ('fields', '\\udc00', '[key]')
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return loc
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and lone_surrogate_at(key) is not None:
                return (*loc, key, "[key]")
            found = lone_surrogate_at(item, (*loc, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, (*loc, index))
            if found is not None:
                return found
    return None


MAX_FIELDS = 1024


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"entity_id": "meter-7", "fields": {"nswprice": 0.056, "vicdemand": 0.42, "region": "NSW"}},
                {"entity_id": "meter-7", "fields": {"nswprice": 0.061}, "event_id": "ev-1001",
                 "ts": 1700000000.0},
            ]
        },
    )

    entity_id: Id = Field(description="whose online state to read (an unknown entity has an empty state)")
    fields: dict[FieldName, FieldValue] = Field(
        max_length=MAX_FIELDS, description="the event's fields: numbers, or strings for categories"
    )
    event_id: Id | None = Field(
        None,
        description="give it to join the learning loop: the vector and prediction are kept for this "
        "event's later label, and the prediction is logged to the `predictions` topic",
    )
    ts: FiniteFloat | None = Field(None, description="event time, epoch seconds (default: now)")


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"event_id": "ev-1001", "prediction": "1", "proba": {"0": 0.31, "1": 0.69},
                          "model_version": 3}]
        }
    )

    event_id: str = Field(description="the request's event_id, or one generated for it")
    prediction: str | None = Field(description="most probable label; null before the model has seen any")
    proba: dict[str, float] = Field(description="probability of each label")
    model_version: int = Field(description="the version that made this prediction")
    arm: str = Field("champion", description="champion, or challenger when the canary routed this entity to it")


class BatchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"items": [{"entity_id": "a", "fields": {"x": 1.0}},
                                                   {"entity_id": "b", "fields": {"x": 2.5}}]}]},
    )

    items: list[PredictRequest] = Field(description="at most `prediction.max_batch` requests")


class BatchResponse(BaseModel):
    items: list[PredictResponse] = Field(description="one answer per item, in order, all from one model version")
    model_version: int


class VersionInfo(BaseModel):
    """A registry version and its lineage (extra lineage fields pass through)."""

    model_config = ConfigDict(extra="allow")

    version: int
    parent: int | None = None
    reason: str | None = None
    drift_id: str | None = None
    spec: str | None = None
    created_at: float | None = None
    updated_at: float | None = None
    examples_seen: int = 0
    revision: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)


class CanaryState(BaseModel):
    share: float = Field(description="share of /v1/predict routed to the challenger, sticky by entity id")
    challenger: int | None = Field(description="the challenger version this worker routes to (loaded)")
    rolled_back: str | None = Field(description="why the last canary was rolled back, if it was")
    served_accuracy: dict[str, float | None] = Field(description="per arm: accuracy of what it served, last labels")
    served_labels: dict[str, int] = Field(description="per arm: served predictions whose label came")


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"share": 0.1}]})

    share: float = Field(ge=0.0, le=1.0, description="share of /v1/predict to route to the challenger")


class ReplicaState(BaseModel):
    """One model this worker serves, and how far it is behind the learner (docs/serving.md)."""

    version: int
    revision: int = Field(description="the registry artifact it was loaded from")
    position: int | None = Field(description="the learner's stream position of the next example it learns; "
                                 "null: served as saved, not learning (the learner does not learn this version)")
    examples: int = Field(description="labelled examples it has learned")
    following: bool = Field(description="it learns every example the learner learns, as the learner learns it")
    lag_examples: int = Field(description="examples the learner has learned (of those this worker has read) "
                              "that it has not")
    lag_seconds: float = Field(description="how long ago the learner learned the first of those")
    digest: str | None = Field(None, description="content hash of the model (GET /v1/models?digest=true); equal to "
                               "the registry's `digest` of the learner's artifact at the same position")


class ModelsResponse(BaseModel):
    model: str = Field(description="model name")
    champion: int | None = Field(description="the registry's champion version")
    challenger: int | None = Field(description="the registry's challenger version, if one is shadowing")
    serving: int | None = Field(description="the version this worker serves now")
    serving_revision: int | None = None
    serving_examples_seen: int | None = Field(None, description="labelled examples the served model has learned "
                                              "(how fresh it is: compare with the learner's)")
    replicas: dict[str, ReplicaState] = Field(default_factory=dict,
                                              description="per role served (champion, the canary's challenger)")
    worker: int = Field(description="process id of the worker that answered (several uvicorn workers)")
    refused: dict[str, str] = Field(default_factory=dict,
                                    description="versions whose artifact this worker refused, and why")
    versions: list[VersionInfo] = Field(description="the newest versions (`limit`), oldest first, with lineage")
    versions_total: int = Field(0, description="lineage records in the registry (learner.keep_records bounds them)")
    canary: CanaryState | None = Field(None, description="canary routing as this worker sees it")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{}, {"version": 2}]})

    version: Annotated[int, Field(ge=1)] | None = Field(
        None, description="the version to go back to (default: the champion's parent)"
    )


class SwapResponse(BaseModel):
    model: str
    from_version: int | None
    to_version: int
    reason: str = Field(description="rollback | manual")
    published: bool = Field(description="whether model.swaps took the message (other replicas follow it; "
                            "if not, they catch up from the registry within seconds)")


class ReadyResponse(BaseModel):
    ready: bool
    model_version: int | None
    reasons: list[str] = Field(description="what is missing, when not ready")


class ErrorResponse(BaseModel):
    detail: Any

"""Pure pieces of the prediction service, without Kafka or Redis: scoring and label mapping, the
body-size guard, the admin guard and the serving reference."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import HTTPException
from pydantic import SecretStr
from river import linear_model, tree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from driftline.shared.admin import check_admin
from driftline.shared.bodylimit import BodyLimit
from driftline.prediction.models import ModelHolder, NonFiniteOutput, score
from driftline.prediction.replica import Replica
from driftline.shared.settings import Settings


def test_score_gives_string_labels_and_the_argmax_as_prediction():
    model = linear_model.LogisticRegression()
    for _ in range(20):
        model.learn_one({"a": 1.0}, True)
        model.learn_one({"a": -1.0}, False)
    prediction, proba = score(model, {"a": 2.0})
    assert set(proba) == {"0", "1"}  # bools come back as the label strings "0"/"1"
    assert prediction == "1" and proba["1"] > 0.5


def test_a_model_that_knows_no_label_yet_predicts_none():
    assert score(tree.HoeffdingTreeClassifier(), {"a": 1.0}) == (None, {})


def test_non_finite_probabilities_are_refused_not_served():
    class Broken:
        def predict_proba_one(self, x):
            return {True: float("nan"), False: float("nan")}

    with pytest.raises(NonFiniteOutput):
        score(Broken(), {"a": 1.0})


def test_a_swap_replaces_the_whole_pair_a_request_grabbed_keeps_its_own():
    holder = ModelHolder("m")
    holder.swap(Replica(model="old", version=1))
    grabbed = holder.current
    holder.swap(Replica(model="new", version=2))
    assert (grabbed.model, grabbed.version) == ("old", 1)
    assert (holder.current.model, holder.current.version) == ("new", 2)


def _echo_app(limit: int) -> BodyLimit:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body())})

    return BodyLimit(Starlette(routes=[Route("/", echo, methods=["POST"])]), max_bytes=limit, service="test")


def _post(app, **kwargs) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/", **kwargs)

    return asyncio.run(go())


def test_body_limit_refuses_a_declared_length_over_the_limit_and_passes_one_at_the_limit():
    app = _echo_app(100)
    assert _post(app, content=b"x" * 101).status_code == 413
    r = _post(app, content=b"x" * 100)
    assert r.status_code == 200 and r.json() == {"size": 100}


def test_body_limit_counts_a_streamed_body_without_content_length():
    app = _echo_app(100)

    async def stream():
        for _ in range(5):
            yield b"y" * 30

    assert _post(app, content=stream()).status_code == 413

    async def small():
        for _ in range(3):
            yield b"y" * 30

    assert _post(app, content=small()).json() == {"size": 90}


def test_body_limit_refuses_a_content_length_that_is_not_a_number():
    assert _post(_echo_app(100), content=b"{}", headers={"content-length": "lots"}).status_code == 400


def test_admin_guard_closed_without_token_401_without_header_or_with_a_wrong_token():
    def status(token, header):
        try:
            check_admin(Settings(admin_token=SecretStr(token) if token is not None else None), header)
        except HTTPException as exc:
            return exc.status_code
        return 200

    assert status(None, "Bearer anything") == 403
    assert status("", "Bearer ") == 403  # an empty token never opens the routes
    assert status("", None) == 403
    assert status("t0k", None) == 401
    assert status("t0k", "Bearer t0K") == 401
    assert status("t0k", "Basic t0k") == 401
    assert status("t0k", "Bearer t0k") == 200


def test_a_request_route_answers_as_its_endpoint_does_documents_its_models_and_refuses_other_params():
    """RequestRoute skips FastAPI's request machinery: the endpoint's own response comes back,
    exception handlers still apply, the OpenAPI still names the response model and the body, and
    an endpoint that asks for more than the Request is refused when the route is made."""
    from fastapi import FastAPI, Query
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel

    from driftline.shared.app import RequestRoute

    class Answer(BaseModel):
        echoed: int

    app = FastAPI()

    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        if not body.isdigit():
            raise RequestValidationError([{"loc": ("body",), "msg": "digits only", "type": "digits"}])
        return JSONResponse({"echoed": int(body)}, headers={"x-kind": "raw"})

    extra = {"requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}}}
    app.router.add_api_route("/echo", echo, methods=["POST"], route_class_override=RequestRoute,
                             response_model=Answer, openapi_extra=extra)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.post("/echo", content=b"41"), await client.post("/echo", content=b"x")]

    ok, refused = asyncio.run(run())
    assert (ok.status_code, ok.json(), ok.headers["x-kind"]) == (200, {"echoed": 41}, "raw")
    assert refused.status_code == 422 and refused.json()["detail"][0]["msg"] == "digits only"
    post = app.openapi()["paths"]["/echo"]["post"]
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Answer")
    assert post["requestBody"] == extra["requestBody"]

    async def with_query(request: Request, n: int = Query(1)) -> JSONResponse:
        return JSONResponse({})

    async def with_response(request: Request, response: Response) -> JSONResponse:
        return JSONResponse({})

    for endpoint in (with_query, with_response):
        with pytest.raises(TypeError, match="takes the Request alone"):
            app.router.add_api_route("/q", endpoint, methods=["POST"], route_class_override=RequestRoute)

"""The gateway's admission middleware: the API key, then the body's size, then its JSON values, all
checked before the app parses a byte."""

from __future__ import annotations

from .inputs import json_values_problem
from .schemas import ApiError


class BodyLimit:
    """ASGI middleware, the gateway's admission: before any other work, a request to a guarded path
    (``/v1/``) without a valid API key is answered 401 without reading a byte of its body (an
    unauthenticated request costs O(1) memory, whatever it sends), then a body over ``limit`` bytes is
    refused while it arrives, then a body with more JSON values than the memory budget allows is
    refused before it is parsed (:func:`json_values_problem`).

    The declared Content-Length is checked first; a chunked body (no length) is counted chunk by
    chunk, and the 413 goes out as soon as the count passes the limit: the rest is never read.
    """

    def __init__(self, app, limit: int, refuse, key_problem=None, guarded: str = "/v1/"):
        self.app, self.limit, self.refuse = app, limit, refuse
        self.key_problem, self.guarded = key_problem, guarded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key_problem is not None and scope.get("path", "").startswith(self.guarded):
            problem = self.key_problem(headers.get(b"authorization", b"").decode("latin-1"))
            if problem is not None:
                from fastapi.responses import JSONResponse  # noqa: PLC0415

                return await JSONResponse(problem.body(), status_code=problem.status)(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send, f"request body is {int(declared)} bytes")
        # The body is read here, within the limit, and its JSON values counted before the app parses
        # anything (json_values_problem); the app then reads it from this buffer.
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left: nothing to answer
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                return await self.refuse(send, f"request body is over {received} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        if scope.get("path", "").startswith(self.guarded) and (problem := json_values_problem(body)) is not None:
            from fastapi.responses import JSONResponse  # noqa: PLC0415

            error = ApiError(400, problem, code="too_many_values")
            return await JSONResponse(error.body(), status_code=400)(scope, receive, send)
        replayed = False

        async def buffered_receive():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, buffered_receive, send)

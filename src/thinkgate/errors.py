"""One exception hierarchy. Each error carries the OpenAI error `type`, the HTTP status and the parameter."""

from __future__ import annotations


class ThinkgateError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


class InvalidRequestError(ThinkgateError, ValueError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(ThinkgateError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(ThinkgateError):
    status = 413
    type = "invalid_request_error"


class ServiceUnavailable(ThinkgateError):
    status = 503
    type = "service_unavailable"

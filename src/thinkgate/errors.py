"""One exception hierarchy, and the one function that writes the OpenAI error body.

Each error carries the OpenAI error `type`, the HTTP status and the parameter it is about."""

from __future__ import annotations


def error_body(message: str, type: str = "server_error", param: str | None = None,
               code: str | None = None) -> dict:
    """`{"error": {...}}` as OpenAI sends it: every error this server returns, in a body or a stream, is this.
    `code` is a string naming the case (e.g. "context_length_exceeded", "model_not_found") or null, as OpenAI
    writes it; the HTTP status is the response's own."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ThinkgateError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # sent with the error response (Retry-After, x-ratelimit-*)

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


# The HTTP status and OpenAI error `type` of each kind of failure.
class InvalidRequestError(ThinkgateError, ValueError):
    status, type = 400, "invalid_request_error"


class AuthenticationError(ThinkgateError):
    """Missing, unknown, revoked or expired key: one message for all, so a caller learns nothing about keys."""
    status, type = 401, "authentication_error"


class PaymentRequired(ThinkgateError):
    status, type = 402, "insufficient_quota"


class PermissionDenied(ThinkgateError):
    status, type = 403, "permission_error"


class NotFoundError(ThinkgateError):
    status, type = 404, "not_found_error"


ModelNotFound = NotFoundError  # an unknown model is one kind of 404


class ConflictError(ThinkgateError):
    status, type = 409, "invalid_request_error"


class PayloadTooLarge(ThinkgateError):
    status, type = 413, "invalid_request_error"


class RateLimited(ThinkgateError):
    status, type = 429, "rate_limit_error"


class ServiceUnavailable(ThinkgateError):
    """The model cannot be served now (its engine stopped, or the server is shutting down)."""
    status, type = 503, "server_error"


class ProviderError(ThinkgateError):
    """A provider failed before its first chunk (an upstream down, timed out or rate limited): the response
    carries the provider's status (502, 503, 504, 429) instead of a stream."""

    def __init__(self, message: str, status: int, type: str, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, code=code, headers=headers)
        self.status, self.type = status, type

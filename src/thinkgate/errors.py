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


class InvalidRequestError(ThinkgateError, ValueError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(ThinkgateError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(ThinkgateError):
    status = 413
    type = "invalid_request_error"


class AuthenticationError(ThinkgateError):
    """Missing, unknown, revoked or expired key: one message for all, so a caller learns nothing about keys."""

    status = 401
    type = "authentication_error"


class PaymentRequired(ThinkgateError):
    status = 402
    type = "insufficient_quota"


class PermissionDenied(ThinkgateError):
    status = 403
    type = "permission_error"


class RateLimited(ThinkgateError):
    status = 429
    type = "rate_limit_error"


class ProviderError(ThinkgateError):
    """A provider failed before its first chunk (an upstream down, timed out or rate limited): the response
    carries the provider's status (502, 503, 504, 429) instead of a stream."""

    def __init__(self, message: str, status: int, type: str, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, code=code, headers=headers)
        self.status, self.type = status, type


class ServiceUnavailable(ThinkgateError):
    """The model cannot be served now (its engine stopped, or the server is shutting down)."""

    status = 503
    type = "server_error"

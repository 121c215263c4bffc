"""Who is signed in to the console, and the checks every console request passes.

- Passwords: argon2id (argon2-cffi's defaults, RFC 9106's second recommended setting), hashed and checked in
  a worker thread (each takes tens of milliseconds on purpose). A hash made with weaker parameters is
  replaced at the next good sign-in.
- Sessions: a random 256-bit cookie value (HttpOnly, SameSite=Strict, Secure over HTTPS, Path=/), stored
  only as its SHA-256 hash, so a database reader cannot sign in with what it sees. The admin's session comes
  from the admin token and has no account; customer sessions have no admin rights.
- CSRF: every state-changing console call is a JSON POST (a cross-site form cannot send that without a CORS
  preflight, which we never grant), carries the session's CSRF token in `X-CSRF-Token`, and an `Origin`,
  when the browser sends one, must be this server's. SameSite=Strict keeps the cookie off cross-site
  requests anyway; the token is the second lock.
- Sign-in rate limit: failed attempts are stored (so several gateway processes share them): at most
  MAX_FAILURES_PER_EMAIL per email and MAX_FAILURES_PER_IP per client address within FAILURE_WINDOW; past
  that, 429 with Retry-After until the oldest failure leaves the window. Sign-ups are counted the same way,
  MAX_SIGNUPS_PER_IP per client address.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import Request, Response

from thinkgate.errors import AuthenticationError, InvalidRequestError, PermissionDenied, RateLimited
from thinkgate.storage.accounts import Account, AccountStore, now
from thinkgate.storage.console import ConsoleStore, Session

COOKIE = "tg_session"
CUSTOMER_LIFETIME = dt.timedelta(days=7)
ADMIN_LIFETIME = dt.timedelta(hours=12)
FAILURE_WINDOW = dt.timedelta(minutes=15)
MAX_FAILURES_PER_EMAIL = 5
MAX_FAILURES_PER_IP = 20
MAX_SIGNUPS_PER_IP = 10  # accounts one client address may create within FAILURE_WINDOW
MIN_PASSWORD, MAX_PASSWORD = 8, 256

_hasher = PasswordHasher()
# Checked against when an email is unknown, so an unknown email costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


def check_password_text(password) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequestError(f"the password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters",
                                  param="password", code="invalid_password")
    return password


async def verify_password(stored: str | None, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


def needs_rehash(stored: str) -> bool:
    return _hasher.check_needs_rehash(stored)


@dataclass(frozen=True)
class Viewer:
    """The console's caller: nobody, a customer (with their account) or the admin."""

    session: Session | None
    account: Account | None = None

    @property
    def is_admin(self) -> bool:
        return self.session is not None and self.session.is_admin

    @property
    def csrf(self) -> str:
        return self.session.csrf_token if self.session is not None else ""


class Auth:
    def __init__(self, console: ConsoleStore | None, store: AccountStore | None, admin_token: str | None):
        self.console = console
        self.store = store
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest() if admin_token else None
        self._admin_hex = self._admin_digest.hex() if self._admin_digest is not None else None

    @property
    def admin_enabled(self) -> bool:
        return self._admin_digest is not None

    def admin_token_ok(self, token: str) -> bool:
        if self._admin_digest is None or not isinstance(token, str):
            return False
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_digest)

    # -- sessions -----------------------------------------------------------------------------------------
    async def viewer(self, request: Request) -> Viewer:
        token = request.cookies.get(COOKIE)
        if not token or self.console is None:
            return Viewer(None)
        session = await asyncio.to_thread(self.console.session, token_hash(token))
        if session is None:
            return Viewer(None)
        # An admin session opened with another admin token (rotated, or the admin view turned off) is void.
        if session.is_admin and (self._admin_hex is None or
                                 not hmac.compare_digest(session.admin_token_hash or "", self._admin_hex)):
            return Viewer(None)
        account = None
        if session.account_id is not None:
            account = await asyncio.to_thread(self.store.account_by_id, session.account_id)
        return Viewer(session, account)

    async def start_session(self, request: Request, response: Response, account_id: int | None,
                            is_admin: bool) -> None:
        old = request.cookies.get(COOKIE)
        if old:  # a new session on every sign-in (no fixation), and the old one ends
            await asyncio.to_thread(self.console.end_session, token_hash(old))
        token = secrets.token_urlsafe(32)
        lifetime = ADMIN_LIFETIME if is_admin else CUSTOMER_LIFETIME
        await asyncio.to_thread(self.console.create_session, token_hash(token), account_id, is_admin,
                                secrets.token_urlsafe(32), lifetime, self._admin_hex if is_admin else None)
        response.set_cookie(COOKIE, token, max_age=int(lifetime.total_seconds()), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    async def end_session(self, request: Request, response: Response) -> None:
        token = request.cookies.get(COOKIE)
        if token and self.console is not None:
            await asyncio.to_thread(self.console.end_session, token_hash(token))
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")

    # -- request checks ---------------------------------------------------------------------------------
    @staticmethod
    def check_origin(request: Request) -> None:
        """A state-changing call: a JSON body, and an Origin (when sent) that is this server's own."""
        ctype = request.headers.get("content-type", "").lower()
        if "application/json" not in ctype:
            raise InvalidRequestError("console calls send a JSON body (Content-Type: application/json)")
        origin = request.headers.get("origin")
        if origin is not None and not same_host(origin, request.headers.get("host", request.url.netloc)):
            raise PermissionDenied("cross-site request refused", code="bad_origin")

    async def require(self, request: Request, *, admin: bool = False, customer: bool = False,
                      write: bool = False) -> Viewer:
        """The signed-in viewer with the rights asked for; a write also passes the CSRF checks."""
        viewer = await self.viewer(request)
        if viewer.session is None:
            raise AuthenticationError("sign in first", code="not_signed_in")
        if admin and not viewer.is_admin:
            raise PermissionDenied("this page is for the admin: sign in with the admin token", code="admin_only")
        if customer and viewer.account is None:
            raise PermissionDenied("this page is for a customer account: sign in with an email", code="customer_only")
        if write:
            self.check_origin(request)
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent.encode(), viewer.csrf.encode()):
                raise PermissionDenied("missing or wrong CSRF token (reload the page)", code="bad_csrf_token")
        return viewer

    # -- sign-in rate limit ---------------------------------------------------------------------------
    async def check_rate(self, subjects: list[str]) -> None:
        since = now() - FAILURE_WINDOW
        for subject in subjects:
            cap = (MAX_SIGNUPS_PER_IP if subject.startswith("signup:") else
                   MAX_FAILURES_PER_IP if subject.startswith("ip:") else MAX_FAILURES_PER_EMAIL)
            seen = await asyncio.to_thread(self.console.failures_since, subject, since)
            if len(seen) >= cap:
                wait = max(1, int((seen[-cap] + FAILURE_WINDOW - now()).total_seconds()) + 1)
                raise RateLimited(f"too many failed sign-ins: try again in {wait} s", code="too_many_sign_ins",
                                  headers={"Retry-After": str(wait)})

    async def note_failure(self, subjects: list[str]) -> None:
        await asyncio.to_thread(self.console.note_failure, subjects, now() - FAILURE_WINDOW)


def same_host(origin: str, host: str) -> bool:
    """Whether a browser's Origin names this server. A proxy that forwards the Host without its port (nginx's
    `$host`) leaves only the name to compare; the CSRF token still has to match."""
    o = urlsplit(origin)
    if not o.hostname:
        return False
    h = urlsplit("//" + host)
    if h.port is None:
        return o.hostname == h.hostname
    return (o.hostname, o.port or {"http": 80, "https": 443}.get(o.scheme)) == (h.hostname, h.port)


def client_subject(request: Request) -> str:
    return "ip:" + (request.client.host if request.client is not None else "unknown")

"""Who may see and change what: HTTP Basic credentials, cross-site checks, CSRF, headers.

Reads may be public only when the operator says so (the CLI does for a loopback
bind); every request that changes data needs credentials, comes from the
dashboard's own origin and carries the form's CSRF token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

USER_ENV: Final = "TASKLET_DASHBOARD_USER"
PASSWORD_ENV: Final = "TASKLET_DASHBOARD_PASSWORD"
SECRET_ENV: Final = "TASKLET_DASHBOARD_SECRET"
CSRF_FIELD: Final = "csrf_token"
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
_MAX_FORM_BYTES: Final = 16_384
_REALM: Final = 'Basic realm="tasklet dashboard", charset="UTF-8"'
_NO_CREDENTIALS: Final = (
    f"actions need credentials: start the dashboard with {USER_ENV} and {PASSWORD_ENV} set"
)
# Pages are server-rendered: no inline script or style, nothing from elsewhere, never framed.
_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "cross-origin-opener-policy": "same-origin",
}


@dataclass(frozen=True, repr=False)
class Credentials:
    """The one user name and password the dashboard accepts."""

    username: str
    password: str

    def accepts(self, authorization: str | None) -> str | None:
        """The user name if the ``Authorization`` header carries these credentials."""
        if authorization is None:
            return None
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        username, colon, password = decoded.partition(":")
        # Both comparisons always run, in constant time, so timing tells nothing.
        user_ok = hmac.compare_digest(username.encode(), self.username.encode())
        password_ok = hmac.compare_digest(password.encode(), self.password.encode())
        return username if (user_ok & password_ok & bool(colon)) else None


def csrf_token(secret: bytes) -> str:
    """The token every form carries: unreadable to other origins, stable for the secret."""
    return hmac.new(secret, b"tasklet-dashboard-csrf", hashlib.sha256).hexdigest()


def new_secret(configured: str | None) -> bytes:
    # Several dashboard processes behind one address must share the secret (SECRET_ENV).
    return configured.encode() if configured else secrets.token_bytes(32)


def route_path(scope: Scope) -> str:
    """The path inside the dashboard, wherever it is mounted."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _cross_site(headers: Headers) -> bool:
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return True
    origin = headers.get("origin")
    if origin is None:
        return False
    # A proxy may rewrite Host; a page on another site cannot set X-Forwarded-Host.
    hosts = {headers.get("host"), headers.get("x-forwarded-host", "").split(",")[0].strip()}
    return origin == "null" or urlsplit(origin).netloc not in hosts - {None, ""}


class Guard:
    """ASGI middleware: authentication, cross-site refusal and security headers."""

    def __init__(
        self, app: ASGIApp, *, credentials: Credentials | None, public_reads: bool
    ) -> None:
        self.app = app
        self.credentials = credentials
        self.public_reads = public_reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        headers = Headers(scope=scope)
        writes = scope["method"] not in _SAFE_METHODS
        user = (
            None
            if self.credentials is None
            else self.credentials.accepts(headers.get("authorization"))
        )
        needs_user = writes or not self.public_reads or route_path(scope) == "/login"
        refusal: PlainTextResponse | None = None
        if needs_user and user is None:
            if self.credentials is None:
                refusal = PlainTextResponse(_NO_CREDENTIALS, status_code=403)
            else:
                refusal = PlainTextResponse(
                    "sign in with the dashboard's user name and password",
                    status_code=401,
                    headers={"www-authenticate": _REALM},
                )
        elif writes and _cross_site(headers):
            refusal = PlainTextResponse("cross-site request refused", status_code=403)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send_with_headers)


async def read_form(request: Request, secret: bytes) -> dict[str, str]:
    """The posted form's fields, after checking its CSRF token (403 when it is wrong)."""
    if request.headers.get("content-type", "").split(";")[0] != (
        "application/x-www-form-urlencoded"
    ):
        raise HTTPException(415, "post the dashboard's own forms")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise HTTPException(413, "form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError) as error:
        raise HTTPException(400, "unreadable form") from error
    form = {key: values[0] for key, values in fields.items()}
    if not hmac.compare_digest(form.get(CSRF_FIELD, "").encode(), csrf_token(secret).encode()):
        raise HTTPException(403, "missing or stale form token: reload the page and try again")
    return form

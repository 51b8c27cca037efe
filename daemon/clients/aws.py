"""The aiobotocore client and botocore error mapping shared by the AWS store, the DynamoDB reporter and aws-iam.

Owns one lazily created aiobotocore client per ``AwsClient`` (created in the
running loop on first use, closed in ``aclose``), the classification of botocore
errors into the ``StoreError`` tree, and the pinning of the botocore loggers. It
is not a store: it knows no secret, key or table layout, and each caller adds
its service's own codes and wording through ``ErrorRules``. It must never put a
request or response body in a log line or an exception.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from daemon.errors import StoreAuthError, StoreConflict, StoreError, StoreNotFound, StoreUnavailable
from daemon.model import Secret

# botocore logs request and response bodies at DEBUG (PutSecretValue's
# SecretString, GetSecretValue's answer, PutItem's report). A daemon run with
# `level: debug` must still never log a secret, so these loggers are pinned at
# WARNING whatever the root level is (their INFO lines are credential-discovery
# chatter anyway). Done at import: every module that talks to AWS imports this one.
for _name in ("botocore", "aiobotocore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# Codes that mean the same in every AWS API; a service's own codes come in
# through ``ErrorRules``.
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "UnauthorizedOperation",
    }
)
NOT_FOUND_CODES = frozenset({"ResourceNotFoundException"})
TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "InternalServiceError",
        "InternalServerError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
    }
)

# What `call` catches and `classify` maps; anything else is a bug and propagates.
BOTO_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, BotoCoreError, ClientError, OSError)


@dataclass(frozen=True)
class ErrorRules:
    """One service's additions to the shared classification.

    ``conflict``: codes meaning "someone else wrote first" (StoreConflict).
    ``transient``: codes that are worth a retry in this service only (the same
    code can mean a hard quota in another). ``not_found``: the text after
    ``"<what>: "`` for ResourceNotFoundException; ``{code}`` is filled in.
    ``explain``: ``(code, phrase, text)``: a code that covers several causes
    (InvalidRequestException) told apart by a phrase of AWS's own message, which
    is matched, never quoted; ``text`` says what it means and what to do.
    """

    conflict: frozenset[str] = field(default_factory=frozenset)
    transient: frozenset[str] = field(default_factory=frozenset)
    not_found: str = "not found ({code})"
    explain: tuple[tuple[str, str, str], ...] = ()
    # This service's own codes for "no such thing" (IAM: NoSuchEntity), mapped like ResourceNotFoundException.
    missing: frozenset[str] = field(default_factory=frozenset)


def classify(e: BaseException, *, what: str, rules: ErrorRules) -> StoreError:
    """A botocore error as a Baton store error: code and status only, never a body."""
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", "Unknown"))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{what} failed: {code} (HTTP {status})"
        message = str(e.response.get("Error", {}).get("Message", "")).lower()
        for known, phrase, meaning in rules.explain:
            if code == known and phrase in message:
                return StoreError(f"{what} failed: {meaning} ({code})")
        if code in AUTH_CODES or status in (401, 403):
            return StoreAuthError(text)
        if code in NOT_FOUND_CODES or code in rules.missing:
            return StoreNotFound(f"{what}: " + rules.not_found.format(code=code))
        if code in rules.conflict:
            return StoreConflict(text)
        if code in TRANSIENT_CODES or code in rules.transient or status >= 500 or status == 429:
            return StoreUnavailable(text)
        return StoreError(text)
    if isinstance(e, NoCredentialsError | PartialCredentialsError):
        return StoreAuthError(f"{what}: no usable AWS credentials ({type(e).__name__})")
    if isinstance(e, BotoConnectionError | HTTPClientError | ConnectionClosedError | TimeoutError | OSError):
        return StoreUnavailable(f"{what}: store unreachable ({type(e).__name__})")
    return StoreError(f"{what} failed ({type(e).__name__})")


class AwsClient:
    """One aiobotocore client for ``service``, created on first use, errors mapped by ``rules``."""

    def __init__(
        self,
        service: str,
        *,
        region: str,
        endpoint_url: str | None,
        timeout: float,
        max_attempts: int,
        rules: ErrorRules | None = None,
        credentials: tuple[str, Secret] | None = None,
    ) -> None:
        self.service = service
        # An access key of its own (a provider testing a key it minted); None: the default chain.
        self._credentials = credentials
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.rules = rules or ErrorRules()
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        # Made on first use, not here: a lock belongs to the loop that awaits it,
        # and the owner may be built before the daemon's loop runs.
        self._lock: asyncio.Lock | None = None

    async def client(self) -> Any:
        """The aiobotocore client; concurrent first callers share one."""
        if self._client is not None:
            return self._client
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is None:
                stack = AsyncExitStack()
                config = AioConfig(
                    connect_timeout=self.timeout,
                    read_timeout=self.timeout,
                    retries={"max_attempts": self.max_attempts, "mode": "standard"},
                )
                keys: dict[str, str] = {}
                if self._credentials is not None:
                    keys = {
                        "aws_access_key_id": self._credentials[0],
                        "aws_secret_access_key": self._credentials[1].reveal(),
                    }
                ctx = get_session().create_client(
                    self.service, region_name=self.region, endpoint_url=self.endpoint_url, config=config, **keys
                )
                self._client = await stack.enter_async_context(ctx)
                self._stack = stack
        return self._client

    async def call(self, op: str, *, what: str, **params: Any) -> dict[str, Any]:
        """``client.<op>(**params)``; a botocore error is raised as ``classify(e, what=what)``."""
        client = await self.client()
        try:
            result: dict[str, Any] = await getattr(client, op)(**params)
        except BOTO_ERRORS as e:
            raise classify(e, what=what, rules=self.rules) from e
        return result

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

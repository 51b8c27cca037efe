"""The Kubernetes client (kubernetes_asyncio): config loading, one lazily made ApiClient, error mapping.

The only module that imports kubernetes_asyncio: the Kubernetes store and the
sidecar (pod reports, container and rollout restarts, leader election) go
through ``KubeClient`` and ``kube_call``. A response body never reaches an
exception or a log line (a Secret's body is the secret). It also owns Baton's
annotation names (``baton.io/...``), shared by the store and the pod reporter.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from daemon.errors import (
    ResourceExpired,
    StoreAuthError,
    StoreConflict,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
)

Obj = dict[str, Any]

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
ANNOTATION_PREFIX = "baton.io/"
GENERIC_PREFIX = "baton."
MERGE_PATCH = "application/merge-patch+json"
# A Secret's annotation: ``<version> <unix time>``, written by the store right after a promote
# returned (so an upper bound of when the Secret began to hold that version).
PROMOTED = "baton.io/promoted"
# A workload's annotation (Reloader-style): ``<credential>[,<credential>...]`` to roll on each new version.
RELOAD = "baton.io/reload"
# The pod template's (an Argo Rollout's own) annotation: ``<credential>@<version>[,...]``, the versions it rolled for.
ROLLED_FOR = "baton.io/rolled-for"

_NAME_PART = 63  # the name part of an annotation key (after the '/') is at most 63 characters


class _DropResponseBodies(logging.Filter):
    """kubernetes_asyncio logs every response body at DEBUG; a Secret's body is the secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("response body")


logging.getLogger("kubernetes_asyncio.client.rest").addFilter(_DropResponseBodies())


def promoted_at(obj: Obj | None, version: str) -> float | None:
    """When the Secret ``obj`` was stamped (``PROMOTED``) as holding ``version``; None if it is not."""
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    said, _, at = str(annotations.get(PROMOTED, "")).partition(" ")
    try:
        when = float(at)
    except ValueError:
        return None
    return when if said == version and math.isfinite(when) else None


def default_namespace(configured: str | None = None) -> str:
    """The configured namespace, else the pod's own (service account mount), else ``default``."""
    if configured:
        return configured
    try:
        return SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def annotation_key(generic: str) -> str:
    """``baton.node.n1`` -> ``baton.io/node.n1``; a name part over 63 characters is shortened with a hash."""
    name = generic[len(GENERIC_PREFIX) :] if generic.startswith(GENERIC_PREFIX) else generic
    if len(name) > _NAME_PART:
        # Deterministic, so the same generic key always maps to the same annotation.
        name = name[: _NAME_PART - 17] + "-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return ANNOTATION_PREFIX + name


def generic_key(annotation: str) -> str | None:
    """The inverse of ``annotation_key`` (None for annotations Baton does not own)."""
    if not annotation.startswith(ANNOTATION_PREFIX):
        return None
    return GENERIC_PREFIX + annotation[len(ANNOTATION_PREFIX) :]


async def new_api_client(*, kubeconfig: Path | None = None) -> client.ApiClient:
    """An ApiClient from a kubeconfig file, else in-cluster config, else ``$KUBECONFIG``/~/.kube/config."""
    cfg = client.Configuration()
    try:
        if kubeconfig is not None:
            await config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg, persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(client_configuration=cfg, persist_config=False)
    except (ConfigException, OSError, ValueError) as e:
        # The loader's message can quote the file; the type is enough to act on.
        raise StoreAuthError(f"cannot load Kubernetes client config ({type(e).__name__})") from None
    return client.ApiClient(cfg)


def status_error(status: int, *, op: str, what: str) -> StoreError:
    """The daemon error for an HTTP status. Only the status goes in the message."""
    text = f"kubernetes {op} {what}: HTTP {status}"
    if status in (401, 403):
        return StoreAuthError(text)
    if status == 404:
        return StoreNotFound(text)
    if status == 409:
        return StoreConflict(text)
    if status == 410:
        return ResourceExpired(text)
    if status == 429 or status >= 500:
        return StoreUnavailable(text)
    return StoreError(text)


async def kube_call(call: Awaitable[Any], *, op: str, what: str) -> Obj:
    """Await a kubernetes_asyncio call made with ``_preload_content=False``; the JSON body on 2xx.

    An error status is mapped without reading the body; a transport error
    becomes ``StoreUnavailable``.
    """
    try:
        resp = await call
    except ApiException as e:
        raise status_error(e.status or 0, op=op, what=what) from _scrubbed(e)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise StoreUnavailable(f"kubernetes {op} {what}: {type(e).__name__}") from e
    try:
        if resp.status >= 400:
            raise status_error(resp.status, op=op, what=what)
        try:
            body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise StoreUnavailable(f"kubernetes {op} {what}: unreadable response ({type(e).__name__})") from None
        return body if isinstance(body, dict) else {}
    finally:
        resp.release()


def _scrubbed(e: ApiException) -> ApiException:
    # ApiException's str() carries the response body and headers: drop them before chaining.
    e.body = None
    e.headers = None
    return e


async def kube_open(call: Awaitable[Any], *, op: str, what: str) -> Any:
    """Await a streaming call (``_preload_content=False``): the response, for its body to be read by the caller.

    An error status or a transport error is mapped (and the response released) as in ``kube_call``.
    """
    try:
        resp = await call
    except ApiException as e:
        raise status_error(e.status or 0, op=op, what=what) from _scrubbed(e)
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise StoreUnavailable(f"kubernetes {op} {what}: {type(e).__name__}") from e
    if resp.status >= 400:
        resp.release()
        raise status_error(resp.status, op=op, what=what)
    return resp


class KubeClient:
    """One ApiClient, made on first use from ``kubeconfig`` (else in-cluster, else ``$KUBECONFIG``)."""

    def __init__(self, *, kubeconfig: Path | None = None) -> None:
        self.kubeconfig = kubeconfig
        self._api: client.ApiClient | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> client.ApiClient:
        async with self._lock:
            if self._api is None:
                self._api = await new_api_client(kubeconfig=self.kubeconfig)
            return self._api

    # Any: every call is raw (dict bodies, _preload_content=False, _content_type),
    # which the generated annotations of kubernetes_asyncio do not describe.
    async def core(self) -> Any:
        return client.CoreV1Api(await self._client())

    async def apps(self) -> Any:
        return client.AppsV1Api(await self._client())

    async def coordination(self) -> Any:
        return client.CoordinationV1Api(await self._client())

    async def custom(self) -> Any:
        return client.CustomObjectsApi(await self._client())

    async def aclose(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

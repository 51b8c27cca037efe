"""Node reports as DynamoDB items: one item per (credential, node), for fleets past 50 tags.

Owns the reporter's own DynamoDB client (a ``daemon.clients.aws`` client,
lazy, closed in ``aclose``), the DynamoDB error codes and wording that
``awsclient`` does not share, and the table layout: partition key
``credential``, sort key ``node``, plus ``key`` (the store key), ``report``
(``NodeReport.to_json()``) and ``heartbeat`` (a Number). Each node writes only its own item, with a condition so that an
older heartbeat never replaces a newer one. It must never import a store
(``daemon.clients.aws`` is the shared client plumbing, not a store), never
create the table unless asked, never log a response body.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from daemon.clients.aws import AwsClient, ErrorRules
from daemon.errors import StoreConflict, StoreError, StoreNotFound
from daemon.model import CredentialName, NodeId
from daemon.report.base import NodeReport

if TYPE_CHECKING:
    from daemon.config import Config

log = logging.getLogger(__name__)

# DynamoDB's own codes and wording; the ones every AWS API shares are in awsclient.
# LimitExceededException is DynamoDB's "too many control-plane calls at once"
# (worth a retry); in Secrets Manager the same code is a hard quota.
_RULES = ErrorRules(
    conflict=frozenset({"ConditionalCheckFailedException", "TransactionConflictException"}),
    transient=frozenset({"LimitExceededException"}),
    not_found="the table does not exist (create it, or run with table creation on)",
)


class DynamoReporter:
    """``Reporter`` writing one DynamoDB item per (credential, node)."""

    absent_means_gone = False

    def __init__(
        self,
        *,
        table: str,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        timeout: float = 10.0,
        max_attempts: int = 3,
        create_table: bool = False,
        page_size: int | None = None,
    ) -> None:
        self.table = table
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.create_table = create_table
        self.page_size = page_size
        self._aws = AwsClient(
            "dynamodb",
            region=region,
            endpoint_url=endpoint_url,
            timeout=timeout,
            max_attempts=max_attempts,
            rules=_RULES,
        )
        self._table_checked = False

    @classmethod
    def from_config(cls, config: Config, _store: object = None, *, create_table: bool = False) -> DynamoReporter:
        """Built by ``daemon.report.open_reporter(config, store)``; the secret store itself is not needed."""
        store = config.store
        if store.kind != "aws" or not store.dynamodb_table:
            raise StoreError("DynamoReporter needs store.kind aws with dynamodb_table set")
        return cls(
            table=store.dynamodb_table,
            region=store.region,
            endpoint_url=store.endpoint_url,
            timeout=store.timeout,
            max_attempts=store.max_attempts,
            create_table=create_table,
        )

    async def _get_client(self) -> Any:
        # The raw aiobotocore client, for tools that hook its events (bench/fleet.py counts requests).
        return await self._aws.client()

    async def _call(self, op: str, **params: Any) -> dict[str, Any]:
        if self.create_table and not self._table_checked:
            await self.ensure_table()
        return await self._raw(op, **params)

    async def _raw(self, op: str, **params: Any) -> dict[str, Any]:
        return await self._aws.call(op, what=f"DynamoDB {op} on table {self.table!r}", **params)

    async def ensure_table(self) -> None:
        """Create the table (on-demand billing) if it is missing, and wait until it is active."""
        try:
            desc = await self._raw("describe_table", TableName=self.table)
        except StoreNotFound:
            try:
                await self._raw(
                    "create_table",
                    TableName=self.table,
                    AttributeDefinitions=[
                        {"AttributeName": "credential", "AttributeType": "S"},
                        {"AttributeName": "node", "AttributeType": "S"},
                    ],
                    KeySchema=[
                        {"AttributeName": "credential", "KeyType": "HASH"},
                        {"AttributeName": "node", "KeyType": "RANGE"},
                    ],
                    BillingMode="PAY_PER_REQUEST",
                )
                log.info("report table created", extra={"table": self.table})
            except StoreError as e:
                if "ResourceInUseException" not in str(e):  # created concurrently: fine
                    raise
            desc = await self._raw("describe_table", TableName=self.table)
        delay = 0.1
        while desc["Table"].get("TableStatus") != "ACTIVE":
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            desc = await self._raw("describe_table", TableName=self.table)
        self._table_checked = True

    async def publish(self, key: str, report: NodeReport) -> None:
        """Write this node's item unless a newer heartbeat is already stored (then StoreConflict)."""
        try:
            await self._call(
                "put_item",
                TableName=self.table,
                Item={
                    "credential": {"S": report.credential},
                    "node": {"S": report.node},
                    "key": {"S": key},
                    "report": {"S": report.to_json()},
                    "heartbeat": {"N": repr(float(report.heartbeat))},
                },
                # `<=`: the same report sent again (a retry) is not a conflict.
                ConditionExpression="attribute_not_exists(#h) OR #h <= :hb",
                ExpressionAttributeNames={"#h": "heartbeat"},
                ExpressionAttributeValues={":hb": {"N": repr(float(report.heartbeat))}},
            )
        except StoreConflict:
            raise StoreConflict(
                f"node {report.node!r} already has a newer report for {report.credential!r}; this one was dropped"
            ) from None

    async def collect(self, key: str, credential: CredentialName) -> list[NodeReport]:
        """Every node's report for ``credential``: one Query, paged by DynamoDB (1 MB a page).

        Only ``node`` and ``report`` are read. ``page_size`` (None: DynamoDB's own
        pages) caps the items per page; a small cap multiplies the requests, and
        some servers (moto) pay for the whole partition on every page.
        """
        reports: list[NodeReport] = []
        params: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "#c = :c",
            "ProjectionExpression": "#n, #r",
            "ExpressionAttributeNames": {"#c": "credential", "#n": "node", "#r": "report"},
            "ExpressionAttributeValues": {":c": {"S": credential}},
            "ConsistentRead": True,
        }
        if self.page_size is not None:
            params["Limit"] = self.page_size
        while True:
            resp = await self._call("query", **params)
            for item in resp.get("Items") or []:
                node = (item.get("node") or {}).get("S")
                try:
                    report = NodeReport.from_json(
                        item["report"]["S"], node=NodeId(node) if isinstance(node, str) else None
                    )
                    if report.credential != credential:  # the partition key says otherwise
                        raise ValueError("report for another credential")
                except (KeyError, ValueError, TypeError):
                    log.warning(
                        "unreadable node report", extra={"table": self.table, "credential": credential, "node": node}
                    )
                    if not isinstance(node, str):
                        continue  # no sort key: not an item this table layout can hold
                    # An unreadable report is an unknown node, and unknown blocks:
                    # stand in a report that is stale from the start.
                    report = NodeReport(node=NodeId(node), credential=credential, current=None)
                reports.append(report)
            last = resp.get("LastEvaluatedKey")
            if not last:
                return reports
            params["ExclusiveStartKey"] = last

    async def forget(self, key: str, node: NodeId) -> None:
        """Delete the node's items for ``key``.

        ``forget`` gets the store key, not the credential, so the items are
        found by a Scan. That is rare (a node known gone) and the table holds
        one small item per credential and node.
        """
        params: dict[str, Any] = {
            "TableName": self.table,
            "FilterExpression": "#n = :n AND #k = :k",
            "ExpressionAttributeNames": {"#c": "credential", "#n": "node", "#k": "key"},
            "ExpressionAttributeValues": {":n": {"S": node}, ":k": {"S": key}},
            "ProjectionExpression": "#c, #n",
            "ConsistentRead": True,
        }
        while True:
            resp = await self._call("scan", **params)
            for item in resp.get("Items") or []:
                await self._call("delete_item", TableName=self.table, Key=item)
                log.info("node report forgotten", extra={"node": node, "credential": item["credential"]["S"]})
            last = resp.get("LastEvaluatedKey")
            if not last:
                return
            params["ExclusiveStartKey"] = last

    async def aclose(self) -> None:
        await self._aws.aclose()

"""S3 source: list each configured bucket/prefix (paged, in key order), read JSONL objects
(gzip when the key ends in .gz), feed their lines to `<prefix>.source.s3` through the feeder,
which enforces the location's tenant (sources/feeder.py).

An object is read at the version that was listed (If-Match on its ETag): one that changes
meanwhile is left for the next poll, one that vanishes is remembered as such; an object replaced
since it was read (another ETag) is read from the start. An object that cannot be read is logged
and skipped until the next poll, a location that cannot be listed likewise: the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from ingest_stream.config import Settings
from ingest_stream.core.files import S3Location, parse_locations
from ingest_stream.sources.feeder import FileFeeder, ProduceFailed, location_health

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 1024
GONE = {"NoSuchKey", "404"}
CHANGED = {"PreconditionFailed", "412"}


class PollIncomplete(Exception):
    """Some locations could not be listed; the others were polled."""


class S3Source:
    name = "s3"

    def __init__(self, settings: Settings, feeder: FileFeeder, health: dict[str, Any]) -> None:
        self._settings = settings
        self._feeder = feeder
        self._health = health
        self.locations: Sequence[S3Location] = parse_locations(settings.sources.s3_sources)

    async def poll(self) -> None:
        """One pass over every location: new, unfinished and replaced objects are fed."""
        s = self._settings.sources
        failed: list[str] = []
        async with get_session().create_client(
                "s3", endpoint_url=s.s3_endpoint_url, region_name=s.s3_region,
                aws_access_key_id=s.s3_access_key_id, aws_secret_access_key=s.s3_secret_access_key) as client:
            backlog = 0
            for location in self.locations:
                where = location.label
                health = location_health(self._health, location.name)
                try:
                    waiting = await self._poll_location(client, location)
                    backlog += waiting
                    health.update(backlog_files=waiting, last_error=None)
                except ProduceFailed:
                    raise
                except Exception as error:  # this location only; the next one is polled
                    log.warning("%s (tenant %s) not polled: %s", where, location.tenant, error, exc_info=True)
                    failed.append(f"{where}: {type(error).__name__}: {error}")
                    health["last_error"] = f"{type(error).__name__}: {error}"[:300]
            self._health["backlog_files"] = backlog
        if failed:
            raise PollIncomplete("; ".join(failed))

    async def _poll_location(self, client: Any, location: S3Location) -> int:
        backlog = 0
        paginator = client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
            for listed in page.get("Contents", []):
                key = listed["Key"]
                if key.endswith("/"):
                    continue  # a "folder" marker
                name = f"s3://{location.bucket}/{key}"
                etag = str(listed["ETag"]).strip('"')
                before = self._feeder.checkpoints.get(name)
                if before is not None and before.done and before.version == etag:
                    continue
                backlog += 1
                try:
                    await self._feed(client, location, key, name, etag, int(listed["Size"]))
                except ProduceFailed:
                    raise
                except Exception as error:  # this object only; the next one is read
                    self._feeder.failed(name, error)
        return backlog

    async def _feed(self, client: Any, location: S3Location, key: str, name: str, etag: str,
                    size: int) -> None:
        async def chunks() -> AsyncGenerator[bytes, None]:
            response = await client.get_object(Bucket=location.bucket, Key=key, IfMatch=f'"{etag}"')
            async with response["Body"] as body:
                while chunk := await body.read(CHUNK_BYTES):
                    yield chunk

        try:
            result = await self._feeder.feed(name, tenant=location.tenant, version=etag, size=size,
                                             chunks=chunks, gzipped=key.endswith(".gz"))
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code"))
            if code in GONE:
                log.warning("%s vanished while being read", name)
                await self._feeder.vanished(name)
                return
            if code in CHANGED:
                log.info("%s changed while being read; next poll", name)
                return
            raise
        if result.sent:
            log.info("%s: %d line(s) sent", name, result.sent)

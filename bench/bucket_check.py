"""Fresh buckets per run, and the check that a run delivered every file with its size."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tvm_upload.localserver import create_bucket, s3_client

logger = logging.getLogger(__name__)

_bucket_numbers = itertools.count(1)

KeyToPath = Callable[[str], str]


def identity_key(key: str) -> str:
    return key


@dataclass
class Delivery:
    """Comparison of a bucket's objects with the files a dataset should have delivered."""

    expected_files: int
    found_objects: int
    missing: int
    wrong_size: int
    unexpected: int

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.wrong_size == 0 and self.unexpected == 0

    def describe(self) -> str:
        return (
            f"{self.found_objects}/{self.expected_files} objects, {self.missing} missing, "
            f"{self.wrong_size} with the wrong size, {self.unexpected} unexpected"
        )


def compare_listing(
    found: dict[str, int], expected: tuple[tuple[str, int], ...], key_to_path: KeyToPath
) -> Delivery:
    """Compare listed object sizes by key with the expected (relative path, size) pairs."""
    delivered = {key_to_path(key): size for key, size in found.items()}
    wanted = dict(expected)

    missing = sum(1 for path in wanted if path not in delivered)
    wrong_size = sum(
        1 for path, size in delivered.items() if path in wanted and wanted[path] != size
    )
    # Counting keys, not paths, also catches two keys that map to one path.
    unexpected = len(found) - sum(1 for path in delivered if path in wanted)
    return Delivery(len(wanted), len(found), missing, wrong_size, unexpected)


class BucketPool:
    """Creates a fresh bucket for each run and deletes it (with its objects) afterwards."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url
        self.client: Any = s3_client(endpoint_url)

    def fresh(self, label: str) -> str:
        name = f"bench-{os.getpid()}-{next(_bucket_numbers)}-{label}".lower()
        create_bucket(self.endpoint_url, name)
        return name

    def warm_up(self, objects: int = 20) -> None:
        """Write and delete a few objects, so the first timed run does not pay the server's start-up."""
        bucket = self.fresh("warm-up")
        for number in range(objects):
            self.client.put_object(Bucket=bucket, Key=f"warm-up/{number}", Body=b"x" * 4096)
        self.delete(bucket)

    def list_sizes(self, bucket: str) -> dict[str, int]:
        """Return every object key in ``bucket`` with its size in bytes."""
        sizes = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                sizes[item["Key"]] = item["Size"]
        return sizes

    def count_objects(self, bucket: str) -> int:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sum(page.get("KeyCount", 0) for page in pages)

    def check_delivery(
        self, bucket: str, expected: tuple[tuple[str, int], ...], key_to_path: KeyToPath
    ) -> Delivery:
        """Compare the bucket's listing with the expected (relative path, size) pairs."""
        return compare_listing(self.list_sizes(bucket), expected, key_to_path)

    def delete(self, bucket: str) -> None:
        """Delete the bucket with every object in it, to free the server's volumes.

        SeaweedFS drops the bucket's collection, objects included, on
        DeleteBucket; a store that rejects that gets its objects deleted first.
        """
        try:
            self.client.delete_bucket(Bucket=bucket)
            return
        except self.client.exceptions.ClientError as error:
            logger.info("DeleteBucket %s failed (%s); deleting its objects first", bucket, error)

        keys = list(self.list_sizes(bucket))
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        self.client.delete_bucket(Bucket=bucket)

"""Upload a directory tree with boto3 ``upload_file``, the way a short fleet script would.

Run by the benchmark with the tools virtualenv's Python. Each file's key is
its path relative to the directory. Exits 1 if any upload failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3


def list_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for folder, _, names in os.walk(root):
        files.extend(Path(folder, name) for name in names)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint-url", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--threads", type=int, default=8, help="files uploaded at a time")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()

    client = boto3.client("s3", endpoint_url=args.endpoint_url)

    def upload(path: Path) -> None:
        client.upload_file(str(path), args.bucket, path.relative_to(args.directory).as_posix())

    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        futures = [pool.submit(upload, path) for path in list_files(args.directory)]

    failures = [future.exception() for future in futures if future.exception() is not None]
    for failure in failures[:5]:
        print(f"upload failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

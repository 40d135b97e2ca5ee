"""Multipart upload journal: the open upload id of a file and its completed parts.

The uploader records each part as S3 confirms it, so an upload interrupted by
a network drop, a restart or a power cut continues from the next part.
"""

from __future__ import annotations

import logging
import sqlite3

from tvm_upload.files import FileIdentity
from tvm_upload.state.database import Database
from tvm_upload.state.records import PartRecord
from tvm_upload.state.schema import identity_params

logger = logging.getLogger(__name__)


def detach_upload(conn: sqlite3.Connection, file_id: int) -> str | None:
    """Clear the file's open multipart upload and its parts; return the upload id it had.

    Aborting the upload in S3 is the uploader's task: the store only drops its record.
    """
    row = conn.execute("SELECT upload_id FROM files WHERE id = ?", (file_id,)).fetchone()
    conn.execute("UPDATE files SET upload_id = NULL, part_size = NULL WHERE id = ?", (file_id,))
    conn.execute("DELETE FROM parts WHERE file_id = ?", (file_id,))
    return None if row is None else row["upload_id"]


class PartJournal(Database):
    """Methods on the ``parts`` table and the ``upload_id`` and ``part_size`` columns."""

    def set_upload(
        self,
        file_id: int,
        upload_id: str,
        part_size: int,
        *,
        identity: FileIdentity | None = None,
    ) -> bool:
        """Store the multipart upload just created for the file and its part size in bytes.

        Parts recorded under any other upload id of this file are dropped. With
        ``identity``, the upload is stored only while the row still has that
        identity, because an upload of older content must never be resumed for
        newer content. Returns False when nothing was stored.
        """
        condition = "id = ?"
        params: tuple[int, ...] = (file_id,)
        if identity is not None:
            condition += " AND device = ? AND inode = ? AND size = ? AND mtime_ns = ?"
            params += identity_params(identity)

        with self.transaction(f"store upload id {upload_id}") as conn:
            cursor = conn.execute(
                f"UPDATE files SET upload_id = ?, part_size = ? WHERE {condition}",
                (upload_id, part_size, *params),
            )
            if cursor.rowcount != 1:
                return False
            conn.execute(
                "DELETE FROM parts WHERE file_id = ? AND upload_id != ?", (file_id, upload_id)
            )
        return True

    def clear_upload(self, file_id: int, upload_id: str | None = None) -> None:
        """Forget the file's multipart upload and its parts, after it completed or was aborted.

        With ``upload_id``, only that upload is forgotten: a newer upload of the
        file stays recorded.
        """
        with self.transaction(f"clear the upload of file id {file_id}") as conn:
            if upload_id is None:
                detach_upload(conn, file_id)
                return
            conn.execute(
                "UPDATE files SET upload_id = NULL, part_size = NULL"
                " WHERE id = ? AND upload_id = ?",
                (file_id, upload_id),
            )
            conn.execute(
                "DELETE FROM parts WHERE file_id = ? AND upload_id = ?", (file_id, upload_id)
            )

    def open_upload_ids(self) -> set[str]:
        """Return the upload id of every multipart upload the store still records, in any state."""
        with self.transaction("list the recorded upload ids", write=False) as conn:
            rows = conn.execute("SELECT upload_id FROM files WHERE upload_id IS NOT NULL")
            return {row["upload_id"] for row in rows}

    def record_part(
        self,
        file_id: int,
        upload_id: str,
        part_number: int,
        size: int,
        etag: str,
        checksum: str | None = None,
    ) -> bool:
        """Store a part that S3 confirmed; return False if ``upload_id`` is no longer the file's.

        The upload id no longer matches when the file changed and was queued
        again while this part was sent: that part is of no further use.
        Recording the same part number again replaces the earlier record.
        """
        with self.transaction(f"record part {part_number} of upload {upload_id}") as conn:
            cursor = conn.execute(
                "INSERT INTO parts (file_id, upload_id, part_number, size, etag, checksum)"
                " SELECT id, upload_id, ?, ?, ?, ? FROM files WHERE id = ? AND upload_id = ?"
                " ON CONFLICT (file_id, upload_id, part_number) DO UPDATE"
                " SET size = excluded.size, etag = excluded.etag, checksum = excluded.checksum",
                (part_number, size, etag, checksum, file_id, upload_id),
            )
            recorded = cursor.rowcount == 1
        if not recorded:
            logger.debug(
                "Ignored part %d of upload %s: not the file's upload", part_number, upload_id
            )
        return recorded

    def parts_for(self, file_id: int, upload_id: str) -> list[PartRecord]:
        """Return the recorded parts of this upload, by part number."""
        with self.transaction(f"read the parts of upload {upload_id}", write=False) as conn:
            rows = conn.execute(
                "SELECT part_number, size, etag, checksum FROM parts"
                " WHERE file_id = ? AND upload_id = ? ORDER BY part_number",
                (file_id, upload_id),
            ).fetchall()
        return [
            PartRecord(
                part_number=row["part_number"],
                size=row["size"],
                etag=row["etag"],
                checksum=row["checksum"],
            )
            for row in rows
        ]

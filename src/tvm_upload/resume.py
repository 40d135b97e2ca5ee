"""Resumable uploads: the state store as parts journal, and the sweep of abandoned uploads.

``StoreJournal`` binds the uploader's ``PartsJournal`` protocol to one row of the
state store, so the upload id, the part size and every completed part survive a
dropped connection, a restart, ``kill -9`` or a power cut. The next attempt
reconciles them with ListParts and continues with the next missing part.

``StaleUploadSweep`` aborts the vehicle's multipart uploads that the state store
no longer records: uploads left by a crash between CreateMultipartUpload and the
journal write, uploads whose file changed or vanished, and uploads whose abort
failed. Their parts are billed until they are aborted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from tvm_upload.errors import StateStoreError, UploadError
from tvm_upload.files import FileIdentity
from tvm_upload.multipart import UploadedPart
from tvm_upload.state import StateStore
from tvm_upload.uploader import Uploader

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_SECONDS = 3600.0
"""Time between sweeps, and before a sweep that failed is tried again without an upload."""


class StoreJournal:
    """The parts journal of one queue row, written to the state store as the upload goes.

    Calls come from the upload thread of the file; the store serialises them with
    the main loop's writes. A failed journal write is logged and the upload goes on,
    because it costs only the chance to resume: an unrecorded upload is aborted by
    the next sweep, and an unrecorded part is sent again or matched by its ETag.
    """

    def __init__(
        self,
        store: StateStore,
        file_id: int,
        identity: FileIdentity,
        *,
        may_have_upload: bool = True,
    ) -> None:
        """Create the journal of row ``file_id`` for the content with ``identity``.

        ``may_have_upload`` False means the row had no multipart upload when it
        was claimed. Only this journal records an upload on a claimed row, so
        ``existing`` then returns None without reading the store.
        """
        self.store = store
        self.file_id = file_id
        self.identity = identity
        self.upload_id: str | None = None
        self._may_have_upload = may_have_upload

    def existing(self) -> tuple[str, int, Sequence[UploadedPart]] | None:
        """Return the recorded upload and its parts, or None.

        An upload recorded while the row had another identity was started for
        older content and is not returned.
        """
        if not self._may_have_upload:
            return None

        try:
            record = self.store.get(self.file_id)
            if record is None or record.identity != self.identity:
                return None
            if record.upload_id is None or record.part_size is None:
                return None
            parts = self.store.parts_for(self.file_id, record.upload_id)
        except StateStoreError as error:
            logger.warning("Cannot read the parts journal of file id %d: %s", self.file_id, error)
            return None

        self.upload_id = record.upload_id
        uploaded = [UploadedPart(p.part_number, p.etag, p.checksum, p.size) for p in parts]
        return record.upload_id, record.part_size, uploaded

    def start(self, upload_id: str, part_size: int) -> None:
        """Record a new multipart upload of the file, unless the row's identity changed."""
        self.upload_id = upload_id
        try:
            stored = self.store.set_upload(
                self.file_id, upload_id, part_size, identity=self.identity
            )
        except StateStoreError as error:
            logger.warning("Cannot record upload %s in the state store: %s", upload_id, error)
            return
        if not stored:
            logger.info(
                "Did not record upload %s of file id %d: the file changed since it was queued",
                upload_id,
                self.file_id,
            )

    def part_done(self, part_number: int, etag: str, checksum: str | None, size: int) -> None:
        """Record a part that the store confirmed."""
        if self.upload_id is None:
            return
        try:
            self.store.record_part(self.file_id, self.upload_id, part_number, size, etag, checksum)
        except StateStoreError as error:
            logger.warning(
                "Cannot record part %d of upload %s: %s", part_number, self.upload_id, error
            )

    def finished(self) -> None:
        """Forget the upload after it was completed or aborted; a newer one stays recorded."""
        if self.upload_id is None:
            return
        try:
            self.store.clear_upload(self.file_id, self.upload_id)
        except StateStoreError as error:
            logger.warning("Cannot clear upload %s in the state store: %s", self.upload_id, error)
        self.upload_id = None


@dataclass
class StaleUploadSweep:
    """Schedule of ``Uploader.abort_stale_uploads`` over the vehicle's prefix.

    A sweep is due at start and every ``SWEEP_INTERVAL_SECONDS``; after a failed
    sweep it is due again at the next successful upload. The caller starts a due
    sweep only while no upload runs and starts no upload until it ends, because an
    upload created between the read of the recorded upload ids and the listing
    would otherwise be aborted. Times are monotonic seconds.
    """

    prefix: str = ""
    next_due_monotonic: float = 0.0
    failed: bool = False
    future: Future[int] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.future is not None

    def due(self, now_monotonic: float) -> bool:
        return self.future is None and now_monotonic >= self.next_due_monotonic

    def start(
        self, executor: Executor, uploader: Uploader, prefix: str, keep: set[str]
    ) -> Future[int]:
        """Submit the sweep of ``prefix``, keeping the upload ids in ``keep``."""
        self.prefix = prefix
        self.future = executor.submit(uploader.abort_stale_uploads, prefix, keep)
        return self.future

    def collect(self, now_monotonic: float) -> UploadError | None:
        """Take the result of a finished sweep; return its error if it failed, else None."""
        if self.future is None or not self.future.done():
            return None
        future, self.future = self.future, None
        self.next_due_monotonic = now_monotonic + SWEEP_INTERVAL_SECONDS

        error = future.exception()
        if error is None:
            self._succeeded(future.result())
            return None

        self.failed = True
        failure = error if isinstance(error, UploadError) else UploadError(repr(error))
        logger.warning(
            "Cannot list the multipart uploads under %s to abort abandoned ones;"
            " trying again after the next upload or in %.0f s: %s",
            self.prefix,
            SWEEP_INTERVAL_SECONDS,
            failure,
        )
        return failure

    def _succeeded(self, aborted: int) -> None:
        self.failed = False
        if aborted:
            logger.info(
                "Aborted %d multipart uploads under %s that the state store no longer records",
                aborted,
                self.prefix,
            )
        else:
            logger.debug("No abandoned multipart uploads under %s", self.prefix)

    def after_upload(self, now_monotonic: float) -> None:
        """Make a failed sweep due again, because the store is reachable once more."""
        if self.failed:
            self.next_due_monotonic = min(self.next_due_monotonic, now_monotonic)

"""Results in a local directory (the default: FLUX_STATE_DIR/results): one file per object,
``<root>/<job id>/<name>``, written atomically and fsynced so a stored result survives a crash."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fluxserve.storage.jobstore.protocol import ResultRef, check_job_id
from fluxserve.storage.outputs import write_atomically
from fluxserve.storage.results.protocol import ResultMissing, ResultStoreUnavailable, result_key, split_key


class LocalResultStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        job_id, name = split_key(key)
        return self.root / job_id / name

    def put(self, job_id: str, name: str, data: bytes, media_type: str) -> ResultRef:
        key = result_key(job_id, name)
        try:
            write_atomically(self._path(key), data)
        except OSError as exc:
            raise ResultStoreUnavailable(f"the result directory cannot be written ({exc.strerror or exc})") from None
        return ResultRef(key, media_type, len(data))

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ResultMissing(key) from None

    def url(self, key: str, *, expires_in: int | None = None) -> str | None:
        return None  # served by the server itself (GET /v1/images/jobs/{id} and its files)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / check_job_id(job_id), ignore_errors=True)

    def problem(self) -> str | None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=self.root):
                pass
        except OSError:
            return "the result directory is not writable (FLUX_STATE_DIR)"
        return None

"""Model downloads: cached by hash, resumed from a partial file, verified."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from fedcollab.coordinator import Coordinator
from fedcollab.coordinator._checkpoints import file_sha256
from fedcollab.errors import RemoteError
from fedcollab.institution import CoordinatorClient
from fedcollab.v1 import coordinator_service_pb2 as pb
from tests.conftest import tiny_federation

pytestmark = pytest.mark.integration


def test_download_resumes_verifies_and_caches(tmp_path: Path) -> None:
    with Coordinator(config=tiny_federation(tmp_path / "c")) as coordinator:
        model = coordinator.engine.current_model
        ref = pb.ModelRef(version=model.version, sha256=model.sha256, size_bytes=model.size_bytes)
        client = CoordinatorClient(address=f"127.0.0.1:{coordinator.port}", credentials=None, rpc_timeout_s=5)
        session = client.join(institution="site", num_train_examples=1).session_id
        cache = tmp_path / "cache"
        cache.mkdir()
        whole = model.path.read_bytes()

        # An interrupted earlier download: the first 1,000 bytes are already here.
        (cache / f"{model.sha256}.part").write_bytes(whole[:1000])
        before = coordinator.engine.bytes_out
        path = client.download(session_id=session, model=ref, cache_dir=cache)
        assert file_sha256(path) == model.sha256
        assert coordinator.engine.bytes_out - before == len(whole) - 1000, "only the missing bytes travel"

        # Cached: a second download moves nothing.
        before = coordinator.engine.bytes_out
        assert client.download(session_id=session, model=ref, cache_dir=cache) == path
        assert coordinator.engine.bytes_out == before

        # A corrupt partial file is detected by the whole-file hash and thrown away.
        path.unlink()
        (cache / f"{model.sha256}.part").write_bytes(b"\x00" * 1000)
        with pytest.raises(RemoteError) as err:
            client.download(session_id=session, model=ref, cache_dir=cache)
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.DATA_LOSS, "MODEL_HASH_MISMATCH")
        assert not (cache / f"{model.sha256}.part").exists()
        assert file_sha256(client.download(session_id=session, model=ref, cache_dir=cache)) == model.sha256

        # A coordinator that names a model by something other than a SHA-256 is refused
        # before the name touches the file system.
        with pytest.raises(RemoteError, match="not a SHA-256"):
            client.download(session_id=session, model=pb.ModelRef(sha256="../../x"), cache_dir=cache)
        client.close()

"""An institution that dies mid-upload: joins, takes its TRAIN task, sends the header
and the first chunk of a valid update, prints READY and hangs until it is killed."""

from __future__ import annotations

import sys
import time

import grpc
import torch

from fedcollab.v1 import coordinator_service_pb2 as pb
from fedcollab.v1 import coordinator_service_pb2_grpc as pb_grpc
from fedcollab.wire import iter_chunks, stream_sha256, torch_dtype


def main(address: str, name: str) -> None:
    stub = pb_grpc.CoordinatorServiceStub(grpc.insecure_channel(address))
    joined = stub.Join(pb.JoinRequest(institution=name, num_train_examples=1000))
    while (task := stub.PollTask(pb.PollTaskRequest(session_id=joined.session_id, wait_seconds=1)).task).kind \
            != pb.TASK_KIND_TRAIN:
        pass
    # A huge weight: if any of it leaked into the aggregate, the test would see it.
    deltas = [torch.full(tuple(s.shape), 100.0, dtype=torch_dtype(s.dtype)) for s in task.manifest.tensors]
    header = pb.UpdateHeader(session_id=joined.session_id, round=task.round, nonce=task.nonce,
                             base_version=task.model.version, manifest=task.manifest,
                             total_bytes=sum(d.numel() * 4 for d in deltas), sha256=stream_sha256(deltas),
                             num_examples=1000)

    def requests():  # type: ignore[no-untyped-def]
        yield pb.UploadUpdateRequest(header=header)
        yield pb.UploadUpdateRequest(chunk=next(iter(iter_chunks(deltas, chunk_bytes=joined.chunk_bytes))))
        time.sleep(0.3)  # let the first chunk reach the coordinator
        print("READY", flush=True)
        time.sleep(3600)

    stub.UploadUpdate(requests())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

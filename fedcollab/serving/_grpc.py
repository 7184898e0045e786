"""PredictionService over gRPC: thin. Requests become checked batches for the loaded
model; a Rejected becomes google.rpc.Status with its reason, anything unexpected
INTERNAL for that call only."""

from __future__ import annotations

import logging

import grpc

from fedcollab.errors import Rejected
from fedcollab.serving._inputs import batch_from_buffer
from fedcollab.serving._model import LoadedModel
from fedcollab.v1 import serving_service_pb2 as spb
from fedcollab.v1 import serving_service_pb2_grpc as spb_grpc
from fedcollab.wire import to_grpc_status

log = logging.getLogger("fedcollab.serving")

_INPUT_KINDS = {"float": spb.INPUT_KIND_FLOAT, "tokens": spb.INPUT_KIND_TOKENS}


class PredictionServicer(spb_grpc.PredictionServiceServicer):
    def __init__(self, *, model: LoadedModel, max_batch: int) -> None:
        self._model = model
        self._max_batch = max_batch
        self._info = model_info_message(model.info(max_batch=max_batch))

    def Predict(self, request: spb.PredictRequest, context: grpc.ServicerContext) -> spb.PredictResponse:
        try:
            batch = batch_from_buffer(self._model.spec, shape=request.shape, values=request.values,
                                      tokens=request.tokens, max_batch=self._max_batch)
            labels, probs = self._model.predict(batch)
        except Rejected as e:
            context.abort_with_status(to_grpc_status(e))
        except Exception:
            log.exception("Predict failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the model server; see its log")
        card = self._model.card
        predictions = [spb.Prediction(label=label, probabilities=p)
                       for label, p in zip(labels.tolist(), probs.tolist(), strict=True)]
        return spb.PredictResponse(predictions=predictions, num_classes=self._model.num_classes,
                                   model_version=card.version, model_sha256=card.sha256)

    def GetModelInfo(self, request: spb.GetModelInfoRequest, context: grpc.ServicerContext) -> spb.ModelInfo:
        return self._info


def model_info_message(info: dict) -> spb.ModelInfo:
    """ModelInfo from LoadedModel.info's JSON form."""
    spec, privacy = info["input"], info["privacy"]
    return spb.ModelInfo(
        federation=info["federation"], study=info["study"], version=info["version"], sha256=info["sha256"],
        kind=info["kind"],
        input=spb.InputSpec(kind=_INPUT_KINDS[spec["kind"]], shape=spec["shape"], max_length=spec["max_length"],
                            vocab_size=spec["vocab_size"], description=spec["description"]),
        num_classes=info["num_classes"], rounds=info["rounds"], contributors=info["contributors"],
        metrics=info["metrics"],
        privacy=spb.PrivacySummary(
            institutions=[spb.InstitutionPrivacy(**p) for p in privacy["institutions"]],
            max_epsilon=privacy["max_epsilon"], central_dp=privacy["central_dp"],
            central_epsilon=privacy["central_epsilon"], central_delta=privacy["central_delta"]),
        max_batch=info["max_batch"], published_at=info["published_at"],
        lineage_key_fingerprint=info["lineage_key_fingerprint"], lineage_key_pinned=info["lineage_key_pinned"],
    )

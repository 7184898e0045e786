"""Update compression, chosen per study ([study.compression]): fp16/bf16 casts, int8
with a float32 scale per block, top-k sparsification (error feedback is kept at the
institution: fedcollab.institution._error_feedback).

Institutions encode a whole update at once (it is in their memory anyway); the
coordinator decodes chunk by chunk as they arrive, and again from its spool, into the
`TensorPiece`s its streaming sum folds.
"""

from fedcollab.compression._base import UpdateDecoder
from fedcollab.compression._codec import encode_update, encoded_nbytes, update_decoder
from fedcollab.compression._errors import EncodingError
from fedcollab.compression._proto import check_encoding, compression_from_proto, compression_to_proto
from fedcollab.compression._topk import select_topk, topk_count

__all__ = [
    "EncodingError",
    "UpdateDecoder",
    "check_encoding",
    "compression_from_proto",
    "compression_to_proto",
    "encode_update",
    "encoded_nbytes",
    "select_topk",
    "topk_count",
    "update_decoder",
]

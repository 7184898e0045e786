"""Model cards: what a pulled model version is, where it came from, and the check that
the file is the one the coordinator signed (`verify_model_file`)."""

from fedcollab.registry._card import (
    CARD_FORMAT,
    CARD_SUFFIX,
    CardError,
    ModelCard,
    card_path_for,
    lineage_field,
    read_card,
    verify_model_bytes,
    verify_model_file,
    write_card,
)

__all__ = [
    "CARD_FORMAT",
    "CARD_SUFFIX",
    "CardError",
    "ModelCard",
    "card_path_for",
    "lineage_field",
    "read_card",
    "verify_model_bytes",
    "verify_model_file",
    "write_card",
]

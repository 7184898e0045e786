"""Differential privacy owned by the institution (Opacus DP-SGD, a durable ledger) and
institution-level DP at the coordinator (DP-FedAvg)."""

from fedcollab.privacy._accounting import (
    ACCOUNTANTS,
    calibrate_noise,
    compose,
    epsilon_of,
)
from fedcollab.privacy._budget import BudgetExhausted, InstitutionPrivacy, RoundPrivacy
from fedcollab.privacy._central import CentralDP, CentralRelease
from fedcollab.privacy._ledger import (
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    VerifyReport,
    ledger_path,
)
from fedcollab.privacy._opacus import (
    GRAD_SAMPLE_MODES,
    PrivacyError,
    train_private,
    validate_model,
)

__all__ = [
    "ACCOUNTANTS", "GRAD_SAMPLE_MODES", "BudgetExhausted", "CentralDP", "CentralRelease", "InstitutionPrivacy",
    "LedgerEntry", "LedgerError", "PrivacyError", "PrivacyLedger", "RoundPrivacy", "VerifyReport", "calibrate_noise",
    "compose", "epsilon_of", "ledger_path", "train_private", "validate_model",
]

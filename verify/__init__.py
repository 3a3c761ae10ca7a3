"""Verification: finite-field random testing, SMT (z3), and a float gate (installed as superopt.verification).

`verify(a, b)` decides equivalence (check.py), also as `superopt.verify`; `float_gate(candidate, reference)`
checks a candidate's numerics in its own dtypes (numeric.py).
"""

from superopt.verification.check import Counterexample, SignatureMismatch, VerifyResult, check_signature, verify
from superopt.verification.numeric import GateResult, float_gate

__all__ = [
    "Counterexample",
    "GateResult",
    "SignatureMismatch",
    "VerifyResult",
    "check_signature",
    "float_gate",
    "verify",
]

"""Verification: finite-field random testing, SMT (z3), and a float gate.

`verify(a, b)` decides equivalence (check.py); `float_gate(candidate, reference)` checks a candidate's numerics
in its own dtypes (numeric.py).
"""

import sys
import types

from superopt.verify.check import Counterexample, SignatureMismatch, VerifyResult, check_signature, verify
from superopt.verify.numeric import GateResult, float_gate


class _CallableModule(types.ModuleType):
    # The public API is `superopt.verify(a, b)`, but `superopt.verify` is also this package's name, and the
    # import system rebinds the package attribute on every submodule import. A callable package serves both.
    def __call__(self, *args, **kwargs) -> VerifyResult:
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "Counterexample",
    "GateResult",
    "SignatureMismatch",
    "VerifyResult",
    "check_signature",
    "float_gate",
    "verify",
]

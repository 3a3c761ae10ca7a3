"""Verification: finite-field random testing, SMT (z3), and a float gate."""

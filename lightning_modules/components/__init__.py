"""The papers' math: small functions, each computing one equation or step (written in one comment line)."""

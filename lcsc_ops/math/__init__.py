"""Layer 1: pure math, imports torch only."""

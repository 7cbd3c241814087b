"""Layer 2: denoisers and samplers (torch only)."""

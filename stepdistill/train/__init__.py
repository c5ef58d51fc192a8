"""The trainer: one loop on accelerate for every method (DESIGN §4)."""

"""Calibration: streaming input-activation moments of every target linear, and their on-disk cache."""

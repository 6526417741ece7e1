"""Checkpoint I/O above the model: the hub format (`checkpoint`) and atomic file and folder writes (`atomic`)."""

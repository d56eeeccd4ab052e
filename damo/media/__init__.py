"""Media decoding (PyAV) and the frozen encoders' input preparation."""

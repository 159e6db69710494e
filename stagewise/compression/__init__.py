"""Compression methods, one module each: quantize, prune, distill, merge; measure sizes and speed.

The step that runs them, evaluates every candidate and picks one is tasks/compress.py.
"""

"""Making trained models smaller: `quantize.py` (weight-only int8/int4), `distill.py` (teacher -> student).

Nothing is imported here, so `import lmforge.compress` stays cheap; import the modules directly.
"""

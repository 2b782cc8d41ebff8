"""Moving trained models out of lmforge (and HF models in): `hf.py` for Hugging Face directories.

Nothing is imported here, so `import lmforge.export` stays cheap; use `lmforge.export.hf` directly.
"""

"""The family-independent engine core: sessions (`session.py`)."""

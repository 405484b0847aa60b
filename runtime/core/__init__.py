"""The family-independent engine core (docs/engine.md): the engine (engine.py), the session handle
(session.py), the inline round runner (rounds.py) and the block type (blocks.py)."""

"""Hooks into LiveTalk's round stages (runtime/families/livetalk/graphs.py) for tests that slow a
stage down or make it fail: a round's tasks are made from the stages' bodies when it is planned, so a
body replaced here takes effect from the next round on (CPU: nothing is captured)."""
from __future__ import annotations

from collections.abc import Callable


def slot_decoder(engine, slot: int):
    """The SlotDecoder of `slot` (its static input, cache, outputs and decode stages)."""
    return engine.family.round_stages.slots[slot]


def wrap_decodes(engine, slot: int, wrap: Callable[[str, Callable[[], None]], Callable[[], None]]) -> Callable[[], None]:
    """Replace every decode stage body of `slot` by `wrap(stage name, body)`; returns the undo."""
    stages = slot_decoder(engine, slot).stages.values()
    saved = [(stage, stage.body) for stage in stages]
    for stage, body in saved:
        stage.body = wrap(stage.name, body)

    def undo() -> None:
        for stage, body in saved:
            stage.body = body
    return undo

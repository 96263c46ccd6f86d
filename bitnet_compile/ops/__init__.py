"""Operators, one per module: knob space, TE compute definition, schedule, and numpy reference."""

"""The user commands beside `run`: inspect (proposal pickles), eval of any step, demo, plots. Each calls the same
settings and detector code as the steps; pipeline.py only wires them to click."""

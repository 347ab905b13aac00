"""The operator console: a Textual TUI that drives the appliance through its admin API only.

Run it with ``appliance tui`` or ``appliance-tui``; it needs the ``[tui]`` extra (textual).
"""

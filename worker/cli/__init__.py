"""The ``keyrotor`` command line (Typer)."""

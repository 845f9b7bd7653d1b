"""The shell on top: the `dit` Typer app, which turns a user error into one line (`app.py`), one module per command
(`train.py`, `sample.py`, `fid.py`, `convert.py`, `classes.py`) that parses options, calls one core function and
renders its result, the options they share (`options.py`), and the rich bars fed by the core's callbacks
(`progress.py`). The only place that imports typer or rich, prints, or exits."""

"""The commands a user runs, installed as `soho-*` (setup.cfg's console_scripts) and runnable as
`python tools/NAME.py`; each parses its command line and calls the library."""

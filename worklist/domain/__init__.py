"""Pure domain rules: no I/O, no framework, no database.

Everything here takes data (and a `now`) and returns data.
"""

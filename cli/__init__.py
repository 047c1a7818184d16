"""The `bridge` command: a thin layer over the Python API.

Sub-command modules import the code a command runs inside the function that runs it: every call builds all the
sub-commands' parsers, which should load no more than they need.
"""

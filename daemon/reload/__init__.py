"""Reloading consumers: actions (signal, exec, restart, systemd, none), health gates, the Reloader, process control.

It never reads a store or a version file.
"""

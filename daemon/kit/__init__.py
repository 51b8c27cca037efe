"""The foundation every room stands on.

backoff, logs, metrics, sdnotify, tasks (stopping, guarded root tasks), service (the one lifecycle), plugins (the
one loader).

Nothing here knows a store, a provider or a credential; it must never import a room above it.
"""

"""Notifications: the events that matter (rotated, rotation_failed, retired, ...) sent to ``notify:`` sinks.

``hub.Notifier`` takes them from ``kit.logs.event`` and delivers them, off the
caller's path, to each sink: ``webhook.WebhookSink`` (the only httpx import)
or the Kubernetes Events sink of ``sidecar/events.py`` (chosen by name through
``kit.plugins.NOTIFIERS``; this room never imports sidecar).
"""

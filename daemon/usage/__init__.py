"""Who holds which version: fd scans, open events, environment, start times.

Everything here is blocking (psutil, /proc) and is called through
``asyncio.to_thread``; nothing here touches the event loop or a secret value.
"""

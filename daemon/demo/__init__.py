"""`baton demo`: a local store, a rotator, an agent and consumer processes on one machine."""

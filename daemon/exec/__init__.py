"""`baton exec`: run one command with a credential in its environment, restart it on a new version."""

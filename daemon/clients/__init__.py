"""SDK clients: sessions, auth and error mapping for Vault (hvac), AWS (aiobotocore) and Kubernetes.

The only modules that import an SDK; stores, reporters and the sidecar go through them.
"""

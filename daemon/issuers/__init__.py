"""Credentials issued to this node itself (leased dynamic secrets, certificates): see base.py."""

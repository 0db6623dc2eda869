"""Rendezvous (HRW) hashing."""

"""Migrations, packaged as daemon.sql."""

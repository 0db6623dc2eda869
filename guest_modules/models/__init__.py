"""The digits model and sample images, packaged as daemon.guest_models."""

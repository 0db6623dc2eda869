"""The C SDK for guest modules, packaged as daemon.guest_sdk (anvil-compute new-guest copies it)."""

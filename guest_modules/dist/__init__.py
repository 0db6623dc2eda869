"""Built example guest modules, packaged as daemon.guest_dist (see guest_modules/build.py)."""

"""Build the example container image (a busybox rootfs) and load it into Podman.

    python guest_modules/containers/build_busybox_image.py                # build + podman load
    python guest_modules/containers/build_busybox_image.py --output busybox.oci.tar --no-load

Prints the image id, `sha256:<64 hex>`. The builder itself lives in the
package (daemon/executors/podman/example_image.py), so `anvil-compute demo` can build
the image from an installed wheel too.
"""

from __future__ import annotations

import sys

from daemon.executors.podman.example_image import main

if __name__ == "__main__":
    sys.exit(main())

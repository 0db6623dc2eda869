"""anvil-compute: the compute node daemon of the Anvil storage fabric."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anvil-compute")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

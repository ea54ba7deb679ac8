"""FedDyMem: federated unsupervised image anomaly detection with dynamic memory and memory-reduce.

The pure-torch core lives in :mod:`feddymem.models` and :mod:`feddymem.memory`; the reusable
LightningModule is :class:`feddymem.FedDyMemModule`; a whole experiment is :func:`feddymem.train`
(what ``feddymem train`` runs); the Fabric orchestrator is in :mod:`feddymem.federation`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("feddymem")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

from feddymem.errors import FedDyMemError

__all__ = ["FedDyMemError", "FedDyMemModule", "__version__", "train"]


def __getattr__(name: str):
    # Lazy so that `import feddymem` stays cheap and the core never imports Lightning.
    if name == "FedDyMemModule":
        from feddymem.lightning_model import FedDyMemModule

        return FedDyMemModule
    if name == "train":
        from feddymem.api import train

        return train
    raise AttributeError(name)

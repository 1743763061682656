"""Server aggregation rules: federated optimisers and Byzantine-robust rules, one module per family.

``base`` defines the interface and how Safe-FedLLM defense weights compose with every rule; the
registry that turns ``server.aggregator`` into a rule is ``fedguard.federated.aggregation``.
"""

from fedguard.aggregators.base import Aggregator, ClientDeltas, weighted_mean
from fedguard.aggregators.clipping import NormClip
from fedguard.aggregators.coordinate import Median, TrimmedMean
from fedguard.aggregators.dnc import DnC
from fedguard.aggregators.flame import Flame
from fedguard.aggregators.foolsgold import FoolsGold
from fedguard.aggregators.geomed import GeoMed
from fedguard.aggregators.krum import Bulyan, Krum, MultiKrum
from fedguard.aggregators.lasa import Lasa
from fedguard.aggregators.optimisers import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi
from fedguard.aggregators.residual import Residual

ALL_RULES: tuple[type[Aggregator], ...] = (
    FedAvg, FedAvgM, FedProx, FedAdagrad, FedAdam, FedYogi, Krum, MultiKrum, Bulyan, Median, TrimmedMean, GeoMed,
    NormClip, Flame, FoolsGold, DnC, Residual, Lasa,
)

__all__ = ["ALL_RULES", "Aggregator", "Bulyan", "ClientDeltas", "DnC", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM",
           "FedProx", "FedYogi", "Flame", "FoolsGold", "GeoMed", "Krum", "Lasa", "Median", "MultiKrum", "NormClip",
           "Residual", "TrimmedMean", "weighted_mean"]

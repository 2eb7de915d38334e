"""What a pruning choice is: single weights or channel units; each space owns its budgets
and floors, selection, the application of a choice and the independent verification."""

from falcon_prune.spaces.base import Choices, Outcome, Selection, Space
from falcon_prune.spaces.units import UnitChoices, UnitSpace
from falcon_prune.spaces.weights import WeightChoices, WeightSpace

__all__ = ["Choices", "Outcome", "Selection", "Space", "UnitChoices", "UnitSpace",
           "WeightChoices", "WeightSpace"]

"""Expert-parallel load balancing: record load, plan a placement, move expert weights.

`plan_placement` (policy.py) is a pure function of the load; `Placement` (placement.py)
holds its result and the maps derived from it; `location.py` is one layer's placement
on one rank (slots and routing tables); `mover.py` and `balancer.py` move weights.
"""

from vllm_wideep.eplb.placement import Placement
from vllm_wideep.eplb.policy import plan_placement

__all__ = ["Placement", "plan_placement"]

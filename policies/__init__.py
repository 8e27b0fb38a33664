"""Pure decision functions: batch size, model placement, layer loading.

No Ray, no I/O, no imports of edgebatch's other packages: plain data in, plain data
out, so each policy can be tested on recorded traces.
"""

from policies.batch_size import (
    DEFAULT_POLICY,
    POLICIES,
    ControllerState,
    Decision,
    Observation,
    PolicyConfig,
    RealTimeBudget,
    ReasonCode,
    get_policy,
    replay,
)
from policies.loading import (
    BudgetExceeded,
    Free,
    Load,
    LoadPlan,
    ModelSpec,
    Request,
    Run,
    StageSpec,
    order_requests,
    plan_loading,
)
from policies.placement import (
    ConcurrencyLevel,
    ModelDemand,
    NodeInfo,
    Placement,
    PlacementPlan,
    concurrency_level,
    fractional_share,
    plan_placement,
    replan_after_node_loss,
    route_weights,
)

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "BudgetExceeded",
    "ConcurrencyLevel",
    "ControllerState",
    "Decision",
    "Free",
    "Load",
    "LoadPlan",
    "ModelDemand",
    "ModelSpec",
    "NodeInfo",
    "Observation",
    "Placement",
    "PlacementPlan",
    "PolicyConfig",
    "RealTimeBudget",
    "ReasonCode",
    "Request",
    "Run",
    "StageSpec",
    "concurrency_level",
    "fractional_share",
    "get_policy",
    "order_requests",
    "plan_loading",
    "plan_placement",
    "replan_after_node_loss",
    "replay",
    "route_weights",
]

"""Pure decision functions: batch size, placement shares and routing, layer loading.

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
    Placement,
    PlacementPlan,
    concurrency_level,
    fractional_share,
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
    "ModelSpec",
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
    "replay",
    "route_weights",
]

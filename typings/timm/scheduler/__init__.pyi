from typing import Any

from torch.optim import Optimizer

class Scheduler:
    optimizer: Optimizer
    def step(self, epoch: int, metric: float | None = None) -> None: ...
    def step_update(self, num_updates: int, metric: float | None = None) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

def create_scheduler_v2(
    optimizer: Optimizer,
    sched: str = "cosine",
    num_epochs: int = 300,
    **kwargs: Any,
) -> tuple[Scheduler, int]: ...

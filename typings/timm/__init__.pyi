# Minimal stubs for the parts of timm this project uses (timm re-exports implicitly, which
# mypy --strict rejects).
from typing import Any

from torch import nn

def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module: ...
def list_models(filter: str = "", **kwargs: Any) -> list[str]: ...

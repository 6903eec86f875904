"""Minimal stubs for threadpoolctl (the parts pjd_optim uses)."""

from contextlib import AbstractContextManager
from typing import Any

class ThreadpoolController:
    def __init__(self) -> None: ...
    def info(self) -> list[dict[str, Any]]: ...
    def limit(
        self, *, limits: int | str | dict[str, int] | None = None, user_api: str | None = None
    ) -> AbstractContextManager[Any]: ...

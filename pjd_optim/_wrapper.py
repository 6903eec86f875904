"""torch.optim plumbing of an optimizer that wraps another and stays transparent.

The wrapper's ``param_groups``, ``state`` and ``defaults`` *are* the base optimizer's (shared, not
copied), so schedulers built on either, ``zero_grad`` and checkpoints act on the base, and a
plain optimizer's checkpoint loads into the wrapper and back. What the wrapper does not define
is the base's (``sync_lookahead`` of timm's Lookahead, ``is_second_order``, ...). torch's own
plumbing (hook registries, profiler names) comes from ``Optimizer.__init__``; the hooks
registered on the wrapper run around the base's work (``_base_step``, ``state_dict``).
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

# What torch sets on an optimizer instance and ``Optimizer.__getstate__`` does not pickle: an LR
# scheduler's wrapper of the bound ``step`` and its flag (``LRScheduler.__init__``), the hooks.
_TORCH_PER_INSTANCE = frozenset(
    {
        "step",
        "_opt_called",
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    }
)


class WrappedOptimizer(Optimizer):
    # GradScaler unscales the wrapper's gradients itself and steps only where they are finite:
    # its path for optimizers that scale inside their step (fused SGD/Adam) would set
    # ``grad_scale`` and ``found_inf`` on the wrapper, which the base never reads.
    _step_supports_amp_scaling = False

    def __init__(self, base: Optimizer) -> None:
        super().__init__(base.param_groups, base.defaults)
        self.base = base
        self.param_groups = base.param_groups
        self.state = base.state

    def _patch_step_function(self) -> None:
        """torch wraps a class's ``step`` to run the step hooks around all of it. The wrapper
        runs its own around the base's update instead (``_base_step``), where ``.grad`` holds
        the gradient that update applies; torch's global step hooks run once, around the
        base's ``step``."""
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    def _base_step(self, args: tuple[Any, ...]) -> None:
        """``base.step()`` between the step pre- and post-hooks registered on the wrapper, called
        as torch calls them: ``hook(optimizer, args, kwargs)`` with ``step``'s arguments."""
        for pre_hook in self._optimizer_step_pre_hooks.values():
            if pre_hook(self, (self, *args), {}) is not None:
                raise RuntimeError(
                    "A step pre-hook of this optimizer returned new arguments for step(): its "
                    "hooks run after the gradient is computed, just before the base optimizer's "
                    "update, where there are no arguments left to replace. Return None. (No "
                    "parameter changed; .grad holds this step's gradient: zero_grad() first.)"
                )
        self.base.step()
        for post_hook in self._optimizer_step_post_hooks.values():
            post_hook(self, (self, *args), {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict: checkpoints load into the plain optimizer and back.
        The state-dict hooks registered on the wrapper run around it, as torch runs them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state: dict[str, Any] = self.base.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hooked = post_hook(self, state)
            state = state if hooked is None else hooked
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer (a plain optimizer's checkpoint too), between the
        wrapper's load-state-dict hooks."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hooked = pre_hook(self, state_dict)
            state_dict = state_dict if hooked is None else hooked
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups  # torch rebuilds both on load
        self.state = self.base.state
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer."""
        if "base" not in self.__dict__:  # Optimizer.__init__ registering the base's own groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)

    def __getattr__(self, name: str) -> Any:
        """What the wrapper does not define is the base's."""
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def _picklable_state(self) -> dict[str, Any]:
        """``__dict__`` without torch's per-instance plumbing, as ``Optimizer.__getstate__``."""
        return {k: v for k, v in self.__dict__.items() if k not in _TORCH_PER_INSTANCE}

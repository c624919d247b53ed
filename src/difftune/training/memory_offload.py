"""Moving weights between CPU and accelerator: group offload of the denoiser, CPU offload of frozen parts.

- group offload (diffusers hooks): the denoiser's blocks live on the CPU and are brought to the
  device a group at a time during forward (and again during a checkpointed backward);
- model CPU offload: a frozen component (text encoder, VAE) lives on the CPU and moves to the
  device only for the call that uses it (`forward`, `encode`, `decode`);
- `resident`: the same for a whole caching phase, so text encoders and the VAE are never on the
  accelerator together (`offload_during_startup`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from difftune.training.memory_quant import warn_once

if TYPE_CHECKING:
    from difftune.config.schema import TrainConfig

OFFLOAD_METHODS = ("forward", "encode", "decode")
GROUP_OFFLOAD_HOOK = "group_offloading"  # diffusers' registry name of the group offload hook


def apply_offload(
    denoiser: torch.nn.Module,
    config: TrainConfig,
    device: torch.device | str,
    frozen: Sequence[torch.nn.Module] = (),
) -> torch.nn.Module:
    """Install the offloading the config asks for; returns `denoiser`.

    enable_group_offload: diffusers group offload on the denoiser (blocks on the CPU, onloaded to
    `device` while they run). Call after the adapter is attached, so LoRA weights travel with their
    blocks, and do not move the denoiser to `device` yourself afterwards. On a CPU device the hooks
    are still installed with onload = offload = cpu, so the same code path runs everywhere.
    enable_model_cpu_offload: each module of `frozen` stays on the CPU and is moved to `device` only
    while one of its `forward`/`encode`/`decode` calls runs; the denoiser is left where it is.
    """
    device = torch.device(device)
    if config.enable_group_offload and config.enable_model_cpu_offload:
        raise ValueError(
            "config.json: enable_group_offload and enable_model_cpu_offload are both true; both move "
            "weights between CPU and GPU and their hooks conflict. Keep one: enable_group_offload "
            "for a denoiser too big for the GPU, enable_model_cpu_offload for the text encoders/VAE"
        )
    if config.enable_group_offload:
        enable_group_offload(
            denoiser,
            device,
            config.group_offload_type,
            config.group_offload_blocks_per_group,
            config.group_offload_use_stream,
            config.group_offload_to_disk_path,
        )
    if config.enable_model_cpu_offload:
        for module in frozen:
            if module is not None:
                offload_when_idle(module, device)
    return denoiser


def enable_group_offload(
    module: torch.nn.Module,
    device: torch.device,
    offload_type: str = "block_level",
    blocks_per_group: int = 1,
    use_stream: bool = False,
    to_disk_path: str | None = None,
) -> None:
    """diffusers group offloading of `module` onto `device` (offload device: cpu, or a disk folder)."""
    from diffusers.hooks import apply_group_offloading

    if use_stream and device.type != "cuda":
        warn_once(
            "group_offload_use_stream",
            f"group_offload_use_stream needs a CUDA device, training runs on "
            f"{device.type}; offloading without a stream instead",
        )
        use_stream = False
    if device.type == "cpu":
        warn_once(
            "group_offload_cpu",
            "enable_group_offload on a CPU-only machine: weights already live in CPU "
            "memory, so the hooks are installed (onload = offload = cpu) but save nothing",
        )
    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type=offload_type,
        num_blocks_per_group=blocks_per_group if offload_type == "block_level" else None,
        use_stream=use_stream,
        offload_to_disk_path=to_disk_path,
    )
    _pin_trainable_to_device(module, device)
    _onload_for_recompute(module)
    _refetch_saved_weights(module, device)


def _groups(module: torch.nn.Module) -> list:
    groups = []
    for _, child in module.named_modules():
        registry = getattr(child, "_diffusers_hook", None)
        hook = registry.get_hook(GROUP_OFFLOAD_HOOK) if registry is not None else None
        if hook is not None and hook.group not in groups:
            groups.append(hook.group)
    return groups


def _pin_trainable_to_device(module: torch.nn.Module, device: torch.device) -> None:
    """Keep trainable (adapter) weights and their grads on `device` through every onload/offload.

    diffusers' groups move whole modules, and with a stream they restore the pinned CPU copy taken
    when the hooks were installed; either would move the optimizer's weights away or undo its steps.
    """
    for group in _groups(module):
        params = [p for m in group.modules for p in m.parameters() if p.requires_grad]
        params += [p for p in (group.parameters or []) if p.requires_grad]
        if not params:
            continue
        for p in params:
            p.data = p.data.to(device)

        def keeping(move, _params=tuple(params)):
            def move_but_keep_trainable():
                kept = [(p.data, None if p.grad is None else p.grad.data) for p in _params]
                move()
                for p, (data, grad) in zip(_params, kept):
                    p.data = data
                    if grad is not None:
                        p.grad.data = grad

            return move_but_keep_trainable

        group.onload_ = keeping(group.onload_)
        group.offload_ = keeping(group.offload_)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class GroupResidency:
    """Whether one offload group's frozen weights are on the device, and when they may leave it.

    Outside backward the group follows diffusers' hooks (onloaded before its forward, offloaded after).
    Inside backward, gradient checkpointing re-runs the group's blocks; the recomputed graph saves the
    weights themselves, so they stay on the device until the group's backward is done. That moment is
    when the gradient of the group's input stream (the first input tensor that needs a gradient) is
    complete: autograd runs the ready nodes of a block latest-created first, so by then every node of
    the group that reads a frozen weight has run. The group is then offloaded at once and, with
    `prefetch`, the group that ran before it in forward is onloaded (on the side stream, when there is
    one) so its recompute does not wait. Groups whose input needs no gradient go back at the end of the
    backward pass.
    """

    def __init__(self, group, prefetch: bool):
        self.group = group
        self.prefetch = prefetch
        self.previous: GroupResidency | None = None  # the group that ran before this one in forward
        self.on = False
        self.done = False  # its backward finished in the current backward pass
        self.queued = False  # an offload at the end of the backward pass is queued
        self.onloads = 0  # transfers to the device, for accounting
        self._onload, self._offload = group.onload_, group.offload_
        group.onload_, group.offload_ = self.onload, self.offload

    def onload(self, force: bool = False) -> None:
        if self.on:
            if self.group.stream is not None:  # onloaded ahead on the side stream
                torch.accelerator.current_stream().wait_stream(self.group.stream)
            return
        if self.done and _in_backward() and not force:
            return  # diffusers' forward-order prefetch during a recompute: that group is finished
        self._onload()
        self.on = True
        self.onloads += 1
        if _in_backward():
            self.offload()  # queued, in case its own backward never reports (an input without gradient)

    def offload(self) -> None:
        if not _in_backward():
            self._release()
        elif not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def backward_done(self, _grad=None) -> None:
        self.done = True
        self._release()
        if self.prefetch and self.previous is not None and not self.previous.done:
            self.previous.onload()

    def _release(self) -> None:
        if self.on:
            self._offload()
            self.on = False

    def _end_of_backward(self) -> None:
        self.queued = self.done = False
        self._release()


def group_residencies(module: torch.nn.Module) -> list[GroupResidency]:
    """The residency trackers of `module`'s offload groups, in forward order once a forward has run."""
    return list(getattr(module, "_difftune_residencies", []))


def _onload_for_recompute(module: torch.nn.Module) -> None:
    """Keep groups usable while gradient checkpointing re-runs their blocks, and release them after.

    A checkpointed block nested inside a group (such as a UNet-style denoiser's resnet) is re-run
    directly, so its parts onload the group themselves. Each group leaves the device as soon as its own backward is done
    (see GroupResidency); with gradient checkpointing the group that runs next in backward is
    prefetched meanwhile.
    """
    prefetch = bool(getattr(module, "is_gradient_checkpointing", False))
    residencies = [GroupResidency(group, prefetch) for group in _groups(module)]
    order: list[GroupResidency] = []
    module._difftune_residencies = order

    def start_forward(_module, _args):
        if not _in_backward():
            order.clear()

    module.register_forward_pre_hook(start_forward)

    for residency in residencies:
        group = residency.group

        def before(_module, _args, _residency=residency):
            if not _residency.on:
                _residency.onload(force=True)
                if _residency.group.stream is not None:
                    _residency.group.stream.synchronize()

        for top in group.modules:
            for inner in list(top.modules())[1:]:
                inner.register_forward_pre_hook(before)

        def watch_input(_module, args, kwargs, _residency=residency):
            if _in_backward():
                return
            if _residency not in order:
                _residency.previous = order[-1] if order else None
                order.append(_residency)
            _residency.done = False
            stream = next(
                (t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad),
                None,
            )
            if stream is not None and _module is _residency.group.modules[0]:
                stream.register_hook(_residency.backward_done)

        if group.modules:
            group.modules[0].register_forward_pre_hook(watch_input, with_kwargs=True)


def _refetch_saved_weights(module: torch.nn.Module, device: torch.device) -> None:
    """Let backward run after the groups went back to the CPU.

    Autograd saves weights (or views of them) for backward; group offload then swaps their data to
    the CPU, and a convolution's backward would meet a CPU weight. While `module` runs forward,
    saved frozen weights are packed as (parameter, view geometry) - which also frees their device
    copy - and brought back to `device` one at a time when backward needs them.
    """
    frozen = {id(p) for p in module.parameters() if not p.requires_grad}

    def pack(tensor: torch.Tensor):
        base = tensor if isinstance(tensor, torch.nn.Parameter) else tensor._base
        if base is None or id(base) not in frozen or type(base.data) is not torch.Tensor:
            return tensor
        return base, tensor.size(), tensor.stride(), tensor.storage_offset() - base.storage_offset()

    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        base, size, stride, offset = packed
        data = base.detach()
        if data.device != device:
            data = data.to(device, non_blocking=True)
        return data.as_strided(size, stride, data.storage_offset() + offset)

    contexts = []

    def enter(_module, _args):
        contexts.append(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        contexts[-1].__enter__()

    def leave(_module, _args, _output):
        contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def group_offload_hooks(module: torch.nn.Module) -> list[str]:
    """Qualified names of the submodules carrying a diffusers group-offload hook ('' is the module itself)."""
    names = []
    for name, child in module.named_modules():
        registry = getattr(child, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(GROUP_OFFLOAD_HOOK) is not None:
            names.append(name)
    return names


def _move(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def offload_when_idle(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Keep `module` on the CPU; move it to `device` only while its forward/encode/decode runs.

    Inputs must already be on `device`; outputs stay there. Marks the module with
    `_difftune_cpu_offload = device` so callers (and tests) can tell it is installed.
    """
    device = torch.device(device)
    if getattr(module, "_difftune_cpu_offload", None) is not None:
        return module
    _move(module, torch.device("cpu"))
    depth = [0]  # forward may call encode/decode: move only at the outermost call
    for method_name in OFFLOAD_METHODS:
        method = getattr(module, method_name, None)
        if method is None:
            continue

        def on_device(*args, _method=method, **kwargs):
            if depth[0] == 0:
                _move(module, device)
            depth[0] += 1
            try:
                return _method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    _move(module, torch.device("cpu"))

        functools.update_wrapper(on_device, method)
        setattr(module, method_name, on_device)
    module._difftune_cpu_offload = device
    return module


@contextlib.contextmanager
def resident(
    module: torch.nn.Module | None, device: torch.device | str, offload_after: bool
) -> Iterator[torch.nn.Module | None]:
    """Context manager: `module` on `device` inside the block; back on the CPU after it if `offload_after`.

    Used while caching with `offload_during_startup`: wrap the text-embedding pass in
    `resident(text_encoder, ...)` and the latent pass in `resident(vae, ...)`, so the two never share
    the accelerator. None is accepted (a family without that component) and yields None.
    """
    if module is None:
        yield None
        return
    _move(module, torch.device(device))
    try:
        yield module
    finally:
        if offload_after:
            _move(module, torch.device("cpu"))

"""TREAD token routing (config key `tread_config`): a random share of the tokens skips a span of blocks.

From "TREAD: Token Routing for Efficient Architecture-agnostic Diffusion Training" (Krause et al.):
for each route, at the input of block `start_layer_idx` every sample keeps a random subset of
round(N * (1 - selection_ratio)) of its N tokens; only those run through blocks start..end
(both included), each with its own positions (RoPE); after block `end_layer_idx` they are written back
into the full sequence, where the routed-around tokens still hold the values they had at the start.
Negative layer indices count from the end of the block list (-1 is the last block).

Routing happens only while the transformer is training and gradients are on; in eval mode or under
`torch.no_grad()` (validation pipelines) the blocks see every token and the output is unchanged.

It is built from forward hooks on the family's `transformer_blocks`, whose call the family describes
(`Family.routable_block`): which argument holds the tokens (B, N, D), which per-token positions (such
as RoPE) are gathered with them, and which argument the transformer passes unchanged to every block
of one call, so that the routing of that call is found again at each block. With gradient
checkpointing the blocks are run again in the backward pass and must see the same tokens, so the
routing is kept until then.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from difftune.errors import ConfigError

if TYPE_CHECKING:
    from difftune.families.base import RoutableBlock

ROUTE_KEYS = ("selection_ratio", "start_layer_idx", "end_layer_idx")


@dataclass(frozen=True)
class TreadRoute:
    """One route with its block indices resolved (0-based, both ends included)."""

    selection_ratio: float
    start: int
    end: int


def parse_routes(tread_config: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The `routes` list of a `tread_config` value; an error names what is missing."""
    if not isinstance(tread_config, Mapping):
        raise ConfigError(
            f"tread_config must be an object like "
            f'{{"routes": [{{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}}]}}, '
            f"got {tread_config!r}"
        )
    unknown = sorted(set(tread_config) - {"routes"})
    if unknown:
        raise ConfigError(f"tread_config: unknown key(s) {unknown}; the only key is 'routes'")
    routes = tread_config.get("routes")
    if not isinstance(routes, Sequence) or isinstance(routes, str) or not routes:
        raise ConfigError(
            f"tread_config.routes must be a non-empty list of routes, got {routes!r}; e.g. "
            '[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]'
        )
    return list(routes)


def resolve_routes(routes: Sequence[Mapping[str, Any]], num_blocks: int) -> list[TreadRoute]:
    """Check the routes against a model with `num_blocks` transformer blocks and resolve negative indices."""
    resolved: list[TreadRoute] = []
    for index, route in enumerate(routes):
        where = f"tread_config.routes[{index}]"
        if not isinstance(route, Mapping):
            raise ConfigError(f"{where} must be an object with keys {list(ROUTE_KEYS)}, got {route!r}")
        unknown = sorted(set(route) - set(ROUTE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a route has keys {list(ROUTE_KEYS)}")
        missing = [key for key in ROUTE_KEYS if key not in route]
        if missing:
            raise ConfigError(f"{where}: missing key(s) {missing}; a route has keys {list(ROUTE_KEYS)}")
        ratio = route["selection_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio < 1.0:
            raise ConfigError(
                f"{where}.selection_ratio is {ratio!r}; it must be a number strictly between 0 and 1 "
                "(the share of tokens that skip the routed blocks, e.g. 0.5)"
            )
        start = _resolve_layer(route["start_layer_idx"], num_blocks, f"{where}.start_layer_idx")
        end = _resolve_layer(route["end_layer_idx"], num_blocks, f"{where}.end_layer_idx")
        if start > end:
            raise ConfigError(
                f"{where}: start_layer_idx {route['start_layer_idx']} (block {start}) comes after "
                f"end_layer_idx {route['end_layer_idx']} (block {end}) of {num_blocks} transformer blocks; "
                "start_layer_idx must not be after end_layer_idx"
            )
        resolved.append(TreadRoute(float(ratio), start, end))
    spans = sorted(enumerate(resolved), key=lambda item: item[1].start)
    for (first_index, first), (second_index, second) in zip(spans, spans[1:]):
        if second.start <= first.end:
            raise ConfigError(
                f"tread_config.routes[{first_index}] (blocks {first.start}..{first.end}) and "
                f"tread_config.routes[{second_index}] (blocks {second.start}..{second.end}) overlap; "
                "routes must cover separate block ranges"
            )
    return resolved


def _resolve_layer(value: Any, num_blocks: int, key: str) -> int:
    """A block index in [0, num_blocks) from a possibly negative one."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer block index, got {value!r}")
    resolved = value + num_blocks if value < 0 else value
    if not 0 <= resolved < num_blocks:
        raise ConfigError(
            f"{key} is {value}, outside the model's {num_blocks} transformer blocks; use 0..{num_blocks - 1} "
            f"or -{num_blocks}..-1 (negative indices count from the end)"
        )
    return resolved


class TreadRouter:
    """Resolved routes and the random draws of which tokens each sample keeps.

    `seed` is an int or a torch.Generator (shared, e.g. with the noise draws, so that a checkpoint
    of that generator's state also resumes the routing); every draw comes from it alone.
    """

    def __init__(
        self, routes: Sequence[Mapping[str, Any]], num_blocks: int, seed: int | torch.Generator = 0
    ) -> None:
        self.routes = resolve_routes(routes, num_blocks)
        self.num_blocks = num_blocks
        if isinstance(seed, torch.Generator):
            self.generator = seed
        else:
            self.generator = torch.Generator().manual_seed(int(seed))

    def kept_tokens(self, route_index: int, num_tokens: int) -> int:
        """How many of `num_tokens` tokens run through the route's blocks (at least one)."""
        ratio = self.routes[route_index].selection_ratio
        return min(num_tokens, max(1, round(num_tokens * (1.0 - ratio))))

    def select(
        self, route_index: int, batch_size: int, num_tokens: int, device: torch.device
    ) -> torch.Tensor:
        """Indices (B, K) of the tokens each sample keeps, ascending, drawn independently per sample."""
        kept = self.kept_tokens(route_index, num_tokens)
        scores = torch.rand(batch_size, num_tokens, generator=self.generator, device=self.generator.device)
        return scores.topk(kept, dim=1).indices.sort(dim=1).values.to(device)


@dataclass
class _Routing:
    """One transformer call's routing for one route."""

    indices: torch.Tensor  # (B, K) kept token indices
    full: torch.Tensor  # (B, N, D) tokens entering the start block
    positions: torch.Tensor | None  # (B, K, ...) per-token positions (RoPE) of the kept tokens
    keep_for_recompute: bool


class _RouteHooks:
    """The hooks of one route: gather at the start block, positions at the inner ones, scatter after the end."""

    def __init__(
        self, router: TreadRouter, route_index: int, transformer: torch.nn.Module, block: RoutableBlock
    ) -> None:
        self.router = router
        self.route_index = route_index
        self.transformer = transformer
        self.block = block
        self.calls: WeakIdKeyDictionary = WeakIdKeyDictionary()  # the call's tensor -> _Routing

    def enter(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Start block pre-hook: draw the kept tokens (or find this call's draw again) and gather them."""
        call = self.block.call.get(args, kwargs)
        routing = self.calls.get(call)
        if routing is None:
            if not (block.training and torch.is_grad_enabled()):
                return None
            routing = self._new_routing(args, kwargs)
            self.calls[call] = routing
        hidden = _take_tokens(self.block.tokens.get(args, kwargs), routing.indices)
        return self._with_positions(self.block.tokens.replace(args, kwargs, hidden), routing)

    def inner(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Pre-hook of the blocks after the start one: give them the kept tokens' positions."""
        routing = self.calls.get(self.block.call.get(args, kwargs))
        if routing is None or routing.positions is None:
            return None
        return self._with_positions((args, kwargs), routing)

    def leave(
        self, block: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
    ) -> torch.Tensor | None:
        """End block hook: write the kept tokens back into the full sequence (B, N, D)."""
        call = self.block.call.get(args, kwargs)
        routing = self.calls.get(call)
        if routing is None:
            return None
        if not routing.keep_for_recompute:
            del self.calls[call]
        rows = torch.arange(output.shape[0], device=output.device).unsqueeze(1)
        return routing.full.index_put((rows, routing.indices), output.to(routing.full.dtype))

    def _with_positions(self, call: tuple[tuple, dict], routing: _Routing) -> tuple[tuple, dict]:
        if self.block.positions is None:
            return call
        return self.block.positions.replace(*call, routing.positions)

    def _new_routing(self, args: tuple, kwargs: dict) -> _Routing:
        for argument, message in self.block.must_be_none:
            if argument.get(args, kwargs) is not None:
                raise ValueError(message)
        hidden = self.block.tokens.get(args, kwargs)
        batch_size, num_tokens = hidden.shape[:2]
        indices = self.router.select(self.route_index, batch_size, num_tokens, hidden.device)
        positions = None
        if self.block.positions is not None:
            positions = self.block.positions.get(args, kwargs)
            if positions.shape[0] != batch_size:
                positions = positions.expand(batch_size, *positions.shape[1:])
            positions = _take_tokens(positions, indices)
        # With gradient checkpointing the routed blocks run again during backward and need these
        # indices then; the routing is dropped once the gradient of the start block's input is known
        # (a checkpointed forward that is never backpropagated keeps it until the handle is removed).
        keep = bool(getattr(self.transformer, "gradient_checkpointing", False))
        routing = _Routing(indices, hidden, positions, keep)
        if keep and hidden.requires_grad:
            calls, call_key = self.calls, weakref.ref(self.block.call.get(args, kwargs))
            hidden.register_hook(lambda grad: _forget(calls, call_key))
        return routing

    def clear(self) -> None:
        """Forget every kept routing."""
        self.calls.clear()


def _forget(calls: WeakIdKeyDictionary, key: weakref.ref) -> None:
    """Drop a routing once backward is past its start block (a gradient hook; returns no new gradient)."""
    tensor = key()
    if tensor is not None:
        calls.pop(tensor, None)


def _take_tokens(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) -> (B, K, ...): each sample's tokens at its own indices (B, K)."""
    rows = torch.arange(tensor.shape[0], device=tensor.device).unsqueeze(1)
    return tensor[rows, indices.to(tensor.device)]


class TreadHandle:
    """What `apply_tread` returns: the router, and `remove()` to take the routing off the model."""

    def __init__(self, router: TreadRouter, hooks: list, route_hooks: list[_RouteHooks]) -> None:
        self.router = router
        self._hooks = hooks
        self._route_hooks = route_hooks

    def remove(self) -> None:
        """Remove every hook; the transformer then runs all tokens through all blocks again."""
        for hook in self._hooks:
            hook.remove()
        for route in self._route_hooks:
            route.clear()
        self._hooks, self._route_hooks = [], []

    def __enter__(self) -> TreadHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def apply_tread(
    transformer: torch.nn.Module,
    blocks: torch.nn.ModuleList,
    block: RoutableBlock | None,
    tread_config: Mapping[str, Any],
    generator: int | torch.Generator = 0,
) -> TreadHandle:
    """Route tokens around the configured blocks of `transformer` while it trains; returns the handle.

    `blocks` is the transformer's block stack (`Family.transformer_blocks`) and `block` how it calls
    them (`Family.routable_block`; None: refused); `tread_config` is the config value
    {"routes": [{"selection_ratio", "start_layer_idx", "end_layer_idx"}, ...]}; `generator` (or an
    int seed) makes the token draws reproducible.
    """
    if block is None:
        raise ConfigError(
            f"tread_config: the family of {type(transformer).__name__} names no blocks that TREAD can route "
            "tokens around; remove tread_config"
        )
    owner = next(m for m in transformer.modules() if any(child is blocks for child in m.children()))
    router = TreadRouter(parse_routes(tread_config), len(blocks), generator)
    hooks, route_hooks = [], []
    for index, route in enumerate(router.routes):
        route_hook = _RouteHooks(router, index, owner, block)
        route_hooks.append(route_hook)
        hooks.append(blocks[route.start].register_forward_pre_hook(route_hook.enter, with_kwargs=True))
        for inner in range(route.start + 1, route.end + 1):
            hooks.append(blocks[inner].register_forward_pre_hook(route_hook.inner, with_kwargs=True))
        hooks.append(blocks[route.end].register_forward_hook(route_hook.leave, with_kwargs=True))
    return TreadHandle(router, hooks, route_hooks)

"""The ranks of a torch.distributed job split the builds of the graphs they all compile.

Where a default process group is initialized with more than one rank (``torchrun``, data or
tensor parallel), every rank compiles the same graphs and would build the same unique subgraphs.
Instead, for each graph, the ranks agree on the artifacts that miss their memory (the sorted
cache keys, exchanged before any disk lookup, so a disk hit on one rank cannot leave another
waiting); where some rank misses more keys than it builds at once (its build workers plus
itself), the ranks that need the same keys split them (largest subgraphs first, each to the
rank with the fewest nodes so far: the same on every rank); each rank looks up or builds its own
keys as a lone process does; and the ranks then exchange the artifacts' bytes
(``Engine.serialize``) with ``all_gather_object`` on gloo groups of their own, so ranks whose
default group is NCCL exchange CPU bytes too. A key whose owner failed (its bytes are None) is
built by every rank that needs it, with a warning. Only engines that persist their artifacts
take part (inductor, TensorRT).

Keys hold everything that makes artifacts differ, the device included: an inductor artifact
sets its CUDA device by index, so ranks on ``cuda:0`` and ``cuda:1`` of one machine cannot
share one, while the same local ranks of several machines can (or every rank of one machine,
where each process sees only its own GPU, ``CUDA_VISIBLE_DEVICES``, as ``cuda:0``).

This assumes what SPMD programs do: every rank compiles the same graphs in the same order. The
groups are created at the first graph compiled this way, so every rank must reach it in the same
order relative to its own ``new_group`` calls. Where no two ranks need the same keys (ranks
compiling different models, or per-device artifacts) every rank sees it in the same exchange
and builds alone from then on. A rank that compiles a graph no other rank does (``if rank == 0:
evaluate(compiled)``) waits :data:`AGREE_TIMEOUT` for the others, then builds alone from then on;
a failure of the groups (a rank died, :data:`EXCHANGE_TIMEOUT` passed) is logged and the ranks
build alone from then on. A rank that finds the graph's plan in its plan cache
(`trt_subgraph.plan_cache`) builds nothing and takes part with no keys
(:func:`take_part_without_builds`), so ranks whose disk caches differ do not wait for it.
Option ``rank_split_builds="off"`` never splits.
"""

from __future__ import annotations

import collections
import datetime
import heapq
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["balance", "exchange", "owners", "take_part_without_builds", "world"]

# How long a rank waits for the others to reach the same graph (they compile it at about the same
# time; a rank that compiles a graph alone, as in ``if rank == 0: evaluate(compiled)``, builds
# alone after this), and for the others' artifacts (their builds).
AGREE_TIMEOUT = datetime.timedelta(minutes=2)
EXCHANGE_TIMEOUT = datetime.timedelta(minutes=30)
_GROUPS: dict[str, Any] = {}  # gloo groups, by use: "agree", "exchange"
# Why this process builds alone from now on (None: it splits where it can).
_ALONE: str | None = None


def world() -> tuple[int, int] | None:
    """(rank, world size) where torch.distributed's default group has more than one rank and the
    ranks still split their builds, else None."""
    if _ALONE is not None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    size = torch.distributed.get_world_size()
    return (torch.distributed.get_rank(), size) if size > 1 else None


def _stop(level: int, reason: str, *args: Any) -> None:
    global _ALONE
    _ALONE = reason % args
    log.log(level, "trt_subgraph: ranks build alone from now on: %s", _ALONE)


def _gather(use: str, value: Any, size: int) -> list[Any]:
    """Every rank's `value`, in rank order, over the gloo group for `use` (both groups are created
    at the first call, in the same order on every rank)."""
    if not _GROUPS:
        _GROUPS["agree"] = torch.distributed.new_group(backend="gloo", timeout=AGREE_TIMEOUT)
        _GROUPS["exchange"] = torch.distributed.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)
    gathered: list[Any] = [None] * size
    torch.distributed.all_gather_object(gathered, value, group=_GROUPS[use])
    return gathered


def balance(sizes: dict[str, int], size: int) -> dict[str, int]:
    """The owner rank of each key of `sizes` ({key: nodes}): largest first, each to the rank with
    the fewest nodes so far (the lower rank on a tie); the same on every rank."""
    loads = [(0, rank) for rank in range(size)]
    owner: dict[str, int] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        load, rank = heapq.heappop(loads)
        owner[key] = rank
        heapq.heappush(loads, (load + max(sizes[key], 1), rank))
    return owner


def owners(sizes: dict[str, int], slots: int = 1) -> dict[str, int] | None:
    """Agree with the other ranks on the keys that miss their memory ({key: nodes}, this rank's,
    maybe empty) and give each key its owner rank; None where no ranks split this graph (then
    :func:`exchange` is not called).

    `slots`: how many builds this rank runs at once (its build workers plus itself). Where no
    rank misses more keys than its slots, no rank splits the graph: each builds its misses at
    once, and a split would only add the exchange and the load of received artifacts to the
    longest build (measured on two H200 ranks, 3 unique subgraphs and 8 build workers per
    rank: 1.09x the compile time of building alone; RESULTS.md, *Two-GPU machine*).

    The ranks whose keys are this rank's split them (:func:`balance`); a rank whose keys no other
    rank has owns them all. Keys hold what makes an artifact differ (an inductor artifact on
    CUDA is built for one device index), so ranks on one machine may each own all their keys
    while the same local ranks of other machines split theirs. Where every rank's keys differ
    from every other's, the ranks build alone from then on (they compile different graphs, or
    their artifacts are per device). Every rank must call this once for each graph it compiles
    while :func:`world` is not None; it returns the same verdict on every rank.
    """
    here = world()
    if here is None:
        return None
    size = here[1]
    mine = sorted(sizes.items())
    try:
        gathered = _gather("agree", (mine, slots), size)
    except Exception as exc:  # a rank died, a timeout: nobody can count on the group any more
        _stop(logging.WARNING, "agreeing on the graph's subgraphs failed (%s: %s)", type(exc).__name__, exc)
        return None
    every = [keys for keys, _ in gathered]
    teams = collections.Counter(tuple(keys) for keys in every if keys)
    if not any(count > 1 for count in teams.values()):
        if sum(teams.values()) > 1:  # the same graph everywhere would have given one team
            _stop(logging.INFO, "no two ranks need the same subgraphs (different graphs, or per-device artifacts)")
        return None  # at most one rank misses anything: nothing to split
    if all(len(keys) <= its_slots for keys, its_slots in gathered):
        return None  # every rank builds all its misses at once: splitting gains nothing
    team = [r for r, keys in enumerate(every) if keys == mine]
    return {key: team[index] for key, index in balance(sizes, len(team)).items()}


def take_part_without_builds() -> None:
    """Agree and exchange for a graph that this rank compiles without building (its plan was in
    the plan cache), as the ranks that build it expect of every rank: with no keys and no
    artifacts. No effect where :func:`world` is None."""
    if owners({}) is not None:
        exchange({})


def exchange(payloads: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """Send this rank's artifacts ({key: bytes, or None where its build failed}) to every rank
    and get every rank's; {} where the group failed (every rank then builds what it misses)."""
    here = world()
    if here is None:
        return {}
    try:
        every = _gather("exchange", payloads, here[1])
    except Exception as exc:
        _stop(logging.WARNING, "exchanging the built artifacts failed (%s: %s)", type(exc).__name__, exc)
        return {}
    merged: dict[str, bytes | None] = {}
    for found in every:  # a key two teams share: any owner's bytes do
        for key, payload in found.items():
            if merged.get(key) is None:
                merged[key] = payload
    return merged

"""TensorRT optimisation profiles, declared once from the contract.

`clip-triton build-engines` builds one profile per entry (clip_triton/export/engines.py), `clip-triton repo`
lists every one in the TensorRT encoder's instance group (clip_triton/repository.py), and
`check-engines` compares the profiles an engine recorded in its ``engine.json`` with that list. The
list matters: Triton's TensorRT backend creates an execution context only for the profiles the
instance group names, and for profile 0 alone when it names none (tensorrt_backend r25.10,
``src/instance_state.cc``, ``ModelInstanceState::InitOptimizationProfiles``: an empty
``ProfileNames()`` becomes ``("default", 0)``; names are decimal indices, ``src/tensorrt_utils.cc``
``GetProfileIndex``). A request whose shape no available profile holds fails with "request specifies
invalid shape"; the backend picks, per batch, the most optimised available profile that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .contract import ModelContract
from .errors import ClipTritonError


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimisation profile: (min, opt, max) shapes for the encoder's input."""

    input_name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def holds(self, shape: tuple[int, ...]) -> bool:
        return all(lo <= n <= hi for lo, n, hi in zip(self.min, shape, self.max)) and len(shape) == len(self.min)


def profiles_for(contract: ModelContract, tower: str) -> tuple[Profile, ...]:
    """The encoder's optimisation profiles: batch from the contract's batch profile; a dynamic text
    axis gets one profile per bucket, covering the lengths above the previous bucket up to it and
    tuned at the bucket itself (the lengths the tokenizer sends). Every length 2..context is served."""
    spec, _ = contract.encoder_io(tower)
    batch = contract.batch
    if -1 not in spec.shape:
        return (Profile(spec.name, (batch.min, *spec.shape), (batch.opt, *spec.shape), (batch.max, *spec.shape)),)
    profiles, floor = [], 2
    for length in contract.tokenizer.lengths:
        profiles.append(Profile(spec.name, (batch.min, floor), (batch.opt, length), (batch.max, length)))
        floor = length + 1
    return tuple(profiles)


def profile_index(profiles: tuple[Profile, ...], shape: tuple[int, ...]) -> int:
    """The profile that holds ``shape`` (what Triton's TensorRT backend picks for a batch)."""
    for index, profile in enumerate(profiles):
        if profile.holds(tuple(shape)):
            return index
    raise ClipTritonError(f"no optimisation profile holds shape {list(shape)}", f"profiles: {profiles}")


def profile_names(contract: ModelContract, tower: str) -> list[str]:
    """The instance group's ``profile`` list for a TensorRT encoder: every profile, by index."""
    return [str(index) for index in range(len(profiles_for(contract, tower)))]

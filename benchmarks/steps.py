"""Our training step as every benchmark runs it: `pipeline.train.train_step` itself, timed.

No copy of the step lives in benchmarks/. `OurStep` collates a step's batches from the prepared
(or prefix-cached) splits, timed as `collate`, and calls `pipeline.train.train_step`, looked up
at call time. The phase split of a step comes from the real step: for the duration of the call,
the methods train_step calls are wrapped with the phase clock (model.loss -> `forward`,
balancer.backward -> `backward`, optimizer.step, optimizer.zero_grad and balancer.after_step ->
`optimizer`); the rest of train_step (the finite-loss check, the log entry) is `step_other`.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
from torch.profiler import record_function

import pipeline.train
from benchmarks.common import Bench, PhaseClock

# (object attribute, method, phase): the calls train_step makes, labelled.
LABELS = (("model", "loss", "forward"), ("balancer", "backward", "backward"), ("optimizer", "step", "optimizer"),
          ("optimizer", "zero_grad", "optimizer"), ("balancer", "after_step", "optimizer"))
PHASES = ("collate", "forward", "backward", "optimizer", "step_other")


@contextlib.contextmanager
def labelled_calls(clock: PhaseClock, **objects):
    """Wrap the methods in LABELS of `objects` (model=, balancer=, optimizer=) with `clock(phase)`; restore after.

    The wrapper is an instance attribute shadowing the method, so train_step calls it unchanged;
    whatever the instance held before (e.g. an LR scheduler's wrapper of optimizer.step) comes back.
    """
    saved = []
    try:
        for owner, name, phase in LABELS:
            obj = objects.get(owner)
            if obj is None:
                continue
            had, previous = name in vars(obj), vars(obj).get(name)
            method = getattr(obj, name)

            def timed(*args, _method=method, _phase=phase, **kwargs):
                with clock(_phase):
                    return _method(*args, **kwargs)

            object.__setattr__(obj, name, timed)
            saved.append((obj, name, had, previous))
        yield
    finally:
        for obj, name, had, previous in reversed(saved):
            if had:
                object.__setattr__(obj, name, previous)
            else:
                object.__delattr__(obj, name)


class OurStep:
    """`pipeline.train.train_step` on `model` at `precision`, fed by the loop's collate (cached states or ids)."""

    def __init__(self, bench: Bench, model, balancer, optimizer, precision: str, cached: bool, phases: bool = True):
        self.bench, self.model, self.balancer, self.optimizer = bench, model, balancer, optimizer
        self.precision, self.cached, self.phases = precision, cached, phases

    def batches(self, step: dict[str, np.ndarray]) -> dict[str, dict]:
        return self.bench.batches(step, cached=self.cached)

    def __call__(self, step: dict[str, np.ndarray], clock: PhaseClock) -> dict:
        """One step; phase times accumulate in `clock`. Returns train_step's log entry."""
        self.model.set_precision(self.bench.device, self.precision)  # a model may serve two sides
        self.model.train()
        with clock("collate"):
            batches = self.batches(step)
        labels = (labelled_calls(clock, model=self.model, balancer=self.balancer, optimizer=self.optimizer)
                  if self.phases else contextlib.nullcontext())
        inner = clock.total()
        clock.sync()
        start = time.perf_counter()
        with labels, record_function("step_other"):
            entry = pipeline.train.train_step(self.model, batches, self.balancer, self.optimizer)
        clock.sync()
        clock.times["step_other"] += time.perf_counter() - start - (clock.total() - inner)
        return entry

    def block(self, plan: list[dict]) -> dict[str, float]:
        """Run the steps of `plan`; return {phase: seconds}."""
        clock = PhaseClock(self.bench.device)
        for step in plan:
            self(step, clock)
        return dict(clock.times)

"""Run diffusers' pipeline for the benchmark (a JSON spec on stdin, a JSON list on stdout).

Stages are cut with hooks, without touching diffusers: encoding ends at the transformer's first
forward, denoising at the last step's callback, decoding at the end of the call."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch


def main() -> None:
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    from cfgpar.bench.measure import NEGATIVE, bench_image
    from cfgpar.testing.reference import diffusers_pipeline

    pipe = diffusers_pipeline(spec["folder"], edit=spec["edit"])
    marks: dict[str, float] = {}

    def first_forward(*_args, **_kwargs):
        marks.setdefault("first_forward", time.perf_counter())

    def step_end(_pipe, _i, _t, kwargs):
        marks["last_step"] = time.perf_counter()
        return kwargs

    pipe.transformer.register_forward_pre_hook(first_forward)
    rows = []
    for size, steps in spec["points"]:
        kwargs = dict(prompt="make the circle blue" if spec["edit"] else "a blue circle, grey background",
                      negative_prompt=NEGATIVE, true_cfg_scale=4.0, num_inference_steps=steps, height=size,
                      width=size, callback_on_step_end=step_end)
        if spec["edit"]:
            kwargs["image"] = bench_image(size)
        runs = []
        for i in range(spec["runs"] + 1):  # the first is the warm-up
            marks.clear()
            start = time.perf_counter()
            pipe(generator=torch.Generator().manual_seed(0), **kwargs)
            end = time.perf_counter()
            runs.append(dict(encode_s=marks["first_forward"] - start, denoise_s=marks["last_step"] - marks["first_forward"],
                             decode_s=end - marks["last_step"], total_s=end - start))
        rows.append({k: statistics.median(r[k] for r in runs[1:]) for k in runs[0]})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

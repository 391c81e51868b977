"""Online serving: an OpenAI-compatible images API (videos API for video models) in front of one
CFG-parallel engine.

    cfgpar serve [MODEL] --cfg-parallel-size 2 --port 8091

Layout: `cli` (the `serve` subcommand), `app` (FastAPI routes, validation, auth, the page),
`videos` (the Videos API routes) and `video_store` (video jobs and their MP4s, in memory),
`validation` (checks both share), `worker` (the engine thread and its bounded queue),
`metrics` (Prometheus), `errors`.
"""

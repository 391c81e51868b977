"""Online serving: an OpenAI-compatible images API in front of one CFG-parallel engine.

    cfgpar serve [MODEL] --cfg-parallel-size 2 --port 8091

Layout: `cli` (the `serve` subcommand), `app` (FastAPI routes, validation, auth, the page),
`worker` (the engine thread and its bounded queue), `metrics` (Prometheus), `errors`.
"""

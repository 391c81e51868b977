"""`cfgpar plan`'s shared machinery: what every family's cost model builds on. No family is named here.

    interconnects.py   the links between GPUs: one table (NVLink, PCIe), `--interconnect`'s choices
    layouts.py         cfg x ulysses x ring: the valid layouts of N GPUs, a prediction, the ranking
    communication.py   what the CFG all-gather, Ulysses' all-to-alls and ring attention's sends cost
    transformer.py     FLOPs of one transformer layer on one rank; the GPU's fitted throughput
    request_costs.py   one request on N CFG ranks: encoding, the loop, decoding (Amdahl)
    command.py         the request `cfgpar plan` was given, its errors, the table and command-line words

A family's cost model is the module its registry card names (ModelSpec.cost, e.g.
cfgpar/models/wan/cost.py; families that share one, as Qwen-Image's text-to-image and edit
pipelines, share it). cfgpar/plan.py finds the family through cfgpar.models.registry, imports
that module and uses only this of it:

    KNOWN: dict[str, Model]
        hub id -> the family's model record, for every hub id of its cards (ModelSpec.hub_ids):
        their published configs ship with cfgpar, so they are planned offline, at once.
    TRANSFORMERS: tuple[str, ...]
        transformer/config.json `_class_name`s the family plans whatever model_index.json's
        `_class_name` (a fine-tune with a pipeline class of its own); () for most.
    from_configs(name: str, index: dict, config: dict) -> Model
        the record of a folder or hub repo `name` from its model_index.json and
        transformer/config.json, both parsed ({} and {} for a folder recognised by its files,
        ModelSpec.marker_files). cfgpar.models.spec.ModelLoadError, one sentence, on a config it
        cannot read.
    plan(request: command.PlanRequest, model: Model) -> list[str]
        the lines `cfgpar plan` prints: what is predicted, the table, the best command line.
        command.PlanError (a ValueError: one line, exit status 2) on a request the model cannot take.

Model is the family's own record (a frozen dataclass with a `name`); plan.py only passes it on.
"""

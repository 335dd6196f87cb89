"""The QLoRA pipeline's library: everything the stages, flows and `qlora` CLI share.

Subpackages, each importing only those listed before it (no import circle; the test suite
checks it):
- core: paths, params.yaml's schema, I/O, lineage, source fingerprints, DVC's records.
  Torch-free.
- schemas: the JSON reports' schemas, one module per file. Torch-free.
- models: loading the base (full precision, 4 bits) and adapters; the base stage; merging.
- data: the corpus, dataset formats, splits, chat template, validation.
- quant: 4-bit format primitives, weight analysis, LoftQ calibration, the quantize stage.
- train: the QLoRA recipe, its callbacks, batching, loss, the training log.
- evaluation: the lm-eval benchmark, the gate, the method's claims.
- report: the HTML/Markdown report and its charts. Torch-free.
- registry: promoted adapters, their lineage and model cards.
- sweep: a sweep's grid and its leaderboard. Torch-free.
- talk, cli: the `qlora` commands.
"""

"""`qlora serve`: an OpenAI-compatible HTTP API over a trained model.

- app.py: the FastAPI app (/v1/chat/completions, /v1/completions, /v1/models, /health);
- schemas.py: the requests it accepts and the responses it writes, in OpenAI's shapes;
- admission.py: how many requests run at once, and how many may wait;
- engine.py: the interface every engine implements, and the errors a request can get;
- llama_engine.py: a GGUF (and a GGUF LoRA) through llama.cpp, on CPUs;
- transformers_engine.py: the NF4 base + adapter, as `qlora chat` loads it (any device);
- vllm.py: the `vllm serve` command line for a GPU, checked before it is run;
- cli.py: the `qlora serve` command.
"""
